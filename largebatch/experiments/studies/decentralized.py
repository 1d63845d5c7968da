"""Decentralized study: does DecentLaM keep DmSGD's communication savings without its
large-batch accuracy loss (Yuan et al., ICCV 2021)?

All-reduce momentum SGD (PmSGD: ``sgd`` on 4 processes), DmSGD and DecentLaM gossiping
over the ring and the static exponential graph, 4 gloo processes, MNIST-1D, from a
small to a large batch with linear learning-rate scaling and warm-up; each series
(optimizer, topology) tuned per batch size on the validation split, then a second seed.
The section gives test accuracy against batch size next to the paper's claim, the
difference of each decentralized series to PmSGD, and what each cost: time per step,
bytes sent per step and process, and the consensus distance at the end.
"""

from __future__ import annotations

import math

import numpy as np

from largebatch.experiments.analysis import Point
from largebatch.experiments.report import Plot, Section, Table, fmt
from largebatch.experiments.studies.base import (
    Part,
    PartResults,
    Study,
    StudyContext,
    Tuned,
    register,
)
from largebatch.experiments.studies.common import (
    accuracy_table,
    accuracy_text,
    difference,
    flag,
    seconds_per_step,
    signed,
    train_test_figure,
    tuning_table,
    tuning_text,
)
from largebatch.experiments.sweep_config import series_name
from largebatch.tasks import get_task

#: the all-reduce baseline's series (``sgd`` on ``nproc`` processes: PmSGD)
PARALLEL = "sgd"
DECENTRALIZED = ("dmsgd", "decentlam")

#: what Yuan et al. claim (abstract and introduction; their tables were not available to us)
PAPER_CLAIMS = [
    (
        "DmSGD against PmSGD as the batch grows",
        "momentum amplifies DmSGD's inconsistency bias; at large batch this causes "
        "severe accuracy degradation",
    ),
    (
        "DecentLaM against DmSGD and PmSGD",
        "removes the momentum-incurred bias; matches or beats PmSGD at large batch "
        "(ImageNet up to batch 32K)",
    ),
    (
        "communication",
        "DmSGD and DecentLaM average with neighbours only, one exchange per step: "
        "cheaper than PmSGD's global all-reduce",
    ),
]

QUICK = {
    "task": "mnist1d-mlp",
    "task_options": {"num_samples": 1000, "hidden": 32},
    "batch_sizes": [64],
    "topologies": ["ring"],
    "nproc": 2,
    "seeds": [0, 1],
    "epochs": 2,
    "evals_per_run": 2,
}


def model_bytes(part: PartResults) -> int:
    """Bytes of the task's model parameters (what one exchange of a whole model sends)."""
    spec = part.factory.spec
    model = get_task(spec.task, **spec.task_options).build_model()
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bytes_text(point: Point, all_reduce_bytes: float) -> str:
    """Bytes each process sent per step: counted by the gossip, or PmSGD's all-reduce."""
    counted = point.values("gossip_bytes_per_step")
    if counted.size:
        return f"{counted.mean() / 1e3:.1f} kB"
    if point.series == PARALLEL:
        return f"{all_reduce_bytes / 1e3:.1f} kB (all-reduce, computed)"
    return "-"


def consensus_text(point: Point, part: PartResults) -> str:
    """Consensus distance at the end and its peak over the logged evaluations, means over
    the seeds that finished."""
    distances = point.values("consensus_distance")
    if not distances.size:
        return "-"
    peaks = [
        float(np.nanmax(curve))
        for row in point.runs
        if row["status"] == "done"
        and (curve := part.report.curves(row).get("consensus_distance")) is not None
        and np.isfinite(curve).any()
    ]
    peak = f" (peak {np.mean(peaks):.3g})" if peaks else ""
    return f"{distances.mean():.3g}{peak}"


def cost_table(part: PartResults) -> Table:
    """Per series and batch size: accuracy, time per step, bytes per step, consensus."""
    spec = part.factory.spec
    all_reduce = 2 * (spec.nproc - 1) / spec.nproc * model_bytes(part)
    rows = []
    for series, points in part.report.series.items():
        for point in points:
            per_step = seconds_per_step(point) if flag(point) is None else math.nan
            rows.append(
                [
                    series,
                    f"{point.batch_size:,}",
                    accuracy_text(point),
                    fmt(1e3 * per_step),
                    bytes_text(point, all_reduce),
                    consensus_text(point, part),
                ]
            )
    columns = [
        "series", "batch", "test accuracy (%)", "ms per step (with evaluations)",
        "sent per step and process", "consensus distance at the end (peak)",
    ]  # fmt: skip
    return Table(columns, rows)


def against_parallel(part: PartResults) -> Table:
    """Each decentralized series minus PmSGD, and DecentLaM minus DmSGD, per batch size."""
    ctx = part.report
    points = {(p.series, p.batch_size): p for p in ctx.points}
    topologies = sorted({p.runs[0]["config"].get("topology") for p in ctx.points} - {None})
    rows = []
    for topology in topologies:
        for optimizer in DECENTRALIZED:
            series = series_name(optimizer, topology)
            rows.append(
                [f"{series} − {PARALLEL}"]
                + [
                    signed(difference(points.get((series, b)), points.get((PARALLEL, b))))
                    for b in ctx.batch_sizes
                ]
            )
        lam, dm = (series_name(o, topology) for o in ("decentlam", "dmsgd"))
        rows.append(
            [f"{lam} − {dm}"]
            + [
                signed(difference(points.get((lam, b)), points.get((dm, b))))
                for b in ctx.batch_sizes
            ]
        )
    columns = ["test accuracy, points (± s.e., Welch p)", *(f"{b:,}" for b in ctx.batch_sizes)]
    return Table(columns, rows)


def decentralized_sections(context: StudyContext) -> list[Section]:
    part = context.parts["mnist1d-cnn"]
    if not part.rows:
        return [Section("No results", "No run is recorded yet.")]
    spec = part.factory.spec
    text = (
        f"Final test accuracy in % of the processes' average model on `{spec.task}` "
        f"(mean ± std over {len(spec.seeds)} seeds), {spec.nproc} gloo processes on one "
        f"machine, each with an i.i.d. shard of every batch; `{PARALLEL}` is PmSGD "
        "(gradients all-reduced), `dmsgd-T` and `decentlam-T` gossip over topology T "
        "once per step. Budget: "
        f"{spec.epochs:g} epochs, at least {part.protocol.min_steps} steps. Yuan et al. claim "
        "DmSGD loses accuracy against PmSGD as the batch grows and DecentLaM does not "
        "(table below; the paper's tables were not available to us, so no number of theirs "
        "is quoted). The second table gives each decentralized series minus PmSGD at the "
        "same batch size."
    )
    paper = Table(
        ["claim", "Yuan et al. (abstract, introduction)"], [list(c) for c in PAPER_CLAIMS]
    )
    sections = [
        Section(
            "Does DecentLaM keep accuracy at large batch where DmSGD loses it?",
            text,
            [
                Plot(
                    "decentralized_accuracy",
                    train_test_figure(part, "Decentralized training: accuracy vs batch size"),
                    "Test (solid) and training (dashed) accuracy of the average model vs batch "
                    "size",
                )
            ],
            [accuracy_table(part, "series"), against_parallel(part), paper],
        ),
        Section(
            "What each step cost",
            "Per process and step: wall time (the run's wall time over its steps, evaluations "
            "included; the processes share this machine's cores, so the times compare the "
            "methods here, not a cluster: `benchmarks/gossip_step.py` times one step alone) "
            "and the bytes sent, counted by the gossip for DmSGD and DecentLaM. PmSGD's "
            "all-reduce is not counted by the library: its entry is 2(n − 1)/n models, which "
            "`benchmarks/gossip_step.py` measured to match what gloo writes (1.5 models at "
            "n = 4). The consensus distance (1/n) Σ_i ‖x_i − x̄‖² is the last logged value (the "
            "learning rate has decayed to 0 by then) and, in brackets, the largest logged.",
            tables=[cost_table(part)],
        ),
    ]
    tuning = tuning_table(part)
    if tuning is not None:
        sections.append(Section("Learning rates", tuning_text(part), tables=[tuning]))
    return sections


DECENTRALIZED_STUDY = register(
    Study(
        name="decentralized",
        title="PmSGD, DmSGD and DecentLaM on 4 processes as the batch grows (Yuan et al. 2021)",
        question=(
            "As the batch grows, does decentralized momentum SGD (DmSGD) lose accuracy against "
            "all-reduce momentum SGD (PmSGD), and does DecentLaM keep it while sending no more "
            "than DmSGD?"
        ),
        parts=(
            Part(
                "mnist1d-cnn",
                "decentralized.toml",
                Tuned(max_extensions=2, min_steps=300),
                quick=QUICK,
                quick_protocol=Tuned(max_extensions=1, min_steps=10),
            ),
        ),
        sections=decentralized_sections,
        minutes=(20, 1),
    )
)
