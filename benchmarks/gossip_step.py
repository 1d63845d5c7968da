"""One training step of n gloo processes: all-reduce data parallelism against gossip.

Each of ``--nproc`` processes (gloo, one thread each) trains the same MLP on its own
batch. Methods, interleaved round by round so that load on a shared machine hits them
alike:

* ``local``: forward, backward and a momentum-SGD step, no communication (the floor);
* ``all-reduce``: DDP's gradient all-reduce and ``torch.optim.SGD`` (PmSGD), the baseline
  the ratios refer to;
* ``dmsgd-ring``, ``dmsgd-exp``, ``decentlam-exp``, ``dmsgd-one-peer-exp``: the
  decentralized optimizers, gossiping over that topology.

Per method: the step's wall time (the slowest process's, median over rounds) and the
bytes each process sent per step, both as counted by the optimizer (payload) and as
measured: the growth of ``wchar`` in ``/proc/self/io``, i.e. what the process wrote to
its sockets (gloo's headers included). The last table turns the measured bytes into the
communication time a bandwidth-bound link would need per step (bytes / bandwidth, for
each ``--link-gbps``), and says how each method's bytes grow with n.

Run: ``python benchmarks/gossip_step.py [--nproc 4] [--width 1024] [--batch 32]
[--steps 5] [--rounds 5] [--link-gbps 10 100]`` (Linux: reads ``/proc/self/io``).
"""

from __future__ import annotations

import argparse
import math
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from largebatch.optim.decentralized import DecentLaM, DmSGD

METHODS = ["local", "all-reduce", "dmsgd-ring", "dmsgd-exp", "decentlam-exp", "dmsgd-one-peer-exp"]
BASELINE = "all-reduce"


def written_bytes() -> int:
    """Bytes this process has passed to write-type system calls (sockets included)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar")


def build(method: str, width: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )
    settings = dict(lr=0.01, momentum=0.9)
    if method == "local":
        return model, torch.optim.SGD(model.parameters(), **settings)
    if method == BASELINE:
        return DistributedDataParallel(model), torch.optim.SGD(model.parameters(), **settings)
    name, topology = method.split("-", 1)
    optimizer_class = DmSGD if name == "dmsgd" else DecentLaM
    return model, optimizer_class(model.parameters(), topology=topology, **settings)


def measure(method: str, args: argparse.Namespace, rank: int) -> tuple[float, float, float]:
    """(seconds per step, counted bytes per step, written bytes per step) of this process."""
    model, optimizer = build(method, args.width)
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(args.batch, 256, generator=generator)
    targets = torch.randint(0, 10, (args.batch,), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
        optimizer.step()

    for _ in range(2):  # DDP regroups its buckets after the first step
        step()
    gossip = getattr(optimizer, "gossip", None)
    counted_before = gossip.bytes_sent if gossip is not None else 0
    dist.barrier()
    written_before, start = written_bytes(), time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds, written = time.perf_counter() - start, written_bytes() - written_before
    counted = (gossip.bytes_sent - counted_before) if gossip is not None else float("nan")
    if method == BASELINE:  # what a ring all-reduce of the gradients sends
        n = dist.get_world_size()
        counted = args.steps * 2 * (n - 1) / n * sum(p.numel() * 4 for p in model.parameters())
    return seconds / args.steps, counted / args.steps, written / args.steps


def worker(rank: int, port: int, args: argparse.Namespace, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.nproc
    )
    results: dict[str, list[tuple[float, float, float]]] = {m: [] for m in METHODS}
    for _ in range(args.rounds):
        for method in METHODS:
            seconds, counted, written = measure(method, args, rank)
            slowest = torch.tensor([seconds])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            results[method].append((slowest.item(), counted, written))
    if rank == 0:
        out.update(results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32, help="examples per process and step")
    parser.add_argument("--steps", type=int, default=5, help="steps timed per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--link-gbps", type=float, nargs="+", default=[10.0, 100.0])
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.start_processes(
            worker, args=(port, args, shared), nprocs=args.nproc, start_method="fork"
        )
        results = dict(shared)

    model, _ = build("local", args.width)
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    n = args.nproc
    print(f"{n} gloo processes, MLP of {model_bytes / 1e6:.2f} MB (float32), batch {args.batch} "
          f"per process; {args.rounds} rounds x {args.steps} steps, interleaved\n")  # fmt: skip
    print(f"{'method':<20} {'ms/step':>9} {'vs ' + BASELINE:>14} {'counted MB':>11} "
          f"{'written MB':>11} {'written / model':>16}")  # fmt: skip
    base_time = statistics.median(r[0] for r in results[BASELINE])
    for method in METHODS:
        seconds = statistics.median(r[0] for r in results[method])
        counted = statistics.median(r[1] for r in results[method])
        written = statistics.median(r[2] for r in results[method])
        print(f"{method:<20} {seconds * 1e3:>9.1f} {seconds / base_time:>14.2f} "
              f"{counted / 1e6:>11.3f} {written / 1e6:>11.3f} {written / model_bytes:>16.2f}")  # fmt: skip

    growth = {
        "all-reduce": lambda n: 2 * (n - 1) / n,
        "dmsgd-ring": lambda n: 2,
        "dmsgd-exp": lambda n: math.ceil(math.log2(n)),
        "decentlam-exp": lambda n: math.ceil(math.log2(n)),
        "dmsgd-one-peer-exp": lambda n: 1,
    }
    print("\nBandwidth-bound communication per step (measured bytes at n = "
          f"{n}; models sent per process at other n):")  # fmt: skip
    header = "".join(f"{f'{g:g} Gb/s':>12}" for g in args.link_gbps)
    print(f"{'method':<20}{header}   models/step at n=8, 64, 1024")
    for method, models in growth.items():
        written = statistics.median(r[2] for r in results[method])
        times = "".join(f"{written * 8 / (g * 1e9) * 1e3:>10.2f}ms" for g in args.link_gbps)
        print(f"{method:<20}{times}   {models(8):.2f}, {models(64):.2f}, {models(1024):.2f}")


if __name__ == "__main__":
    main()
