"""Hessian-vector products: double backward against ``torch.func.jvp`` over ``torch.func.grad``.

Newton-CG asks for up to ``max_cg`` products at one point; SQN for one. Per
product, on mnist1d-cnn and logreg (default batch 1,024):

* ``double backward, graph reused``: one ``backward(create_graph=True)``, then
  one ``autograd.grad`` of the gradient per product (what
  :class:`largebatch.optim.curvature.HessianVectorProduct` does); the set-up is
  amortised over ``--products`` products;
* ``double backward, per product``: forward, backward with graph and the
  second backward for every product (what
  :class:`largebatch.diagnostics.HessianOperator` does over many batches);
* ``jvp(grad)``: forward-over-reverse with ``torch.func`` on a functional model,
  forward and backward recomputed per product.

All three agree to float32 rounding (checked). Times are CPU seconds of this
process on CPU (``time.process_time``), CUDA-synchronised wall time on GPU;
medians over interleaved rounds, as ratios to the reused-graph product.

Run: ``python benchmarks/hvp.py [--device cpu] [--threads 1] [--batch-size 1024] [--products 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.func import functional_call, grad, jvp

from largebatch.diagnostics import fixed_subset
from largebatch.optim.curvature import FlatParameters, HessianVectorProduct
from largebatch.tasks import get_task


def methods(model, loss_fn, inputs, targets, vectors: list[torch.Tensor]):
    """``name -> () -> list of products`` (flat vectors) for each method."""
    flat = FlatParameters([{"params": list(model.parameters())}])
    names = [name for name, _ in model.named_parameters()]
    detached = {name: p.detach() for name, p in model.named_parameters()}

    def reused() -> list[torch.Tensor]:
        product = HessianVectorProduct(loss_fn(model(inputs), targets), flat)
        return [product(v) for v in vectors]

    def per_product() -> list[torch.Tensor]:
        return [HessianVectorProduct(loss_fn(model(inputs), targets), flat)(v) for v in vectors]

    def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(functional_call(model, params, (inputs,)), targets)

    def forward_over_reverse() -> list[torch.Tensor]:
        products = []
        for v in vectors:
            tangent = dict(zip(names, flat.split(v)))
            _, product = jvp(grad(loss_of), (detached,), (tangent,))
            products.append(flat.flatten(product[name] for name in names))
        return products

    return {
        "double backward, graph reused": reused,
        "double backward, per product": per_product,
        "jvp(grad)": forward_over_reverse,
    }


def clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def synchronised() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return synchronised
    return time.process_time


def benchmark(task_name: str, args, device: torch.device) -> None:
    task = get_task(task_name)
    inputs, targets = fixed_subset(task.train, args.batch_size, batch_size=args.batch_size)[0]
    inputs, targets = inputs.to(device), targets.to(device)
    torch.manual_seed(0)
    model = task.build_model().to(device)
    dim = sum(p.numel() for p in model.parameters())
    vectors = [torch.randn(dim, device=device) for _ in range(args.products)]
    runs = methods(model, task.loss_fn, inputs, targets, vectors)

    reference = runs["double backward, graph reused"]()
    for name, run in runs.items():
        error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(run(), reference))
        assert error < 1e-4, f"{name} disagrees with the reused-graph product: {error:.2e}"

    now = clock(device)
    per_product: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = now()
            run()
            per_product[name].append((now() - start) / args.products)
    base = statistics.median(per_product["double backward, graph reused"])
    print(
        f"\n{task_name} ({dim} parameters), batch {args.batch_size}, {args.products} products "
        f"per point, {device}, {args.rounds} interleaved rounds"
    )
    print(f"{'method':32s} {'ms / product':>13s} {'x reused graph':>15s}")
    for name, values in per_product.items():
        median = statistics.median(values)
        print(f"{name:32s} {1e3 * median:13.2f} {median / base:15.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--products", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tasks", nargs="+", default=["mnist1d-cnn", "logreg"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for task_name in args.tasks:
        benchmark(task_name, args, torch.device(args.device))


if __name__ == "__main__":
    main()
