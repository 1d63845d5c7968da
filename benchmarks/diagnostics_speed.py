"""Speed and accuracy of the diagnostics on mnist1d-cnn (issue targets in brackets).

1. Top Hessian eigenvalue by Lanczos capped at 20 products, against a converged
   reference (200 products, tol 1e-10) [within 1e-2 relative in 20 products].
2. Full-space epsilon-sharpness, 10 L-BFGS-B iterations, on the whole training
   set [under 30 s on 2 CPU cores], for eps = 1e-3 and 5e-4; also p = 100.
3. For scale: one Hessian-vector product and a 30-probe Hutchinson trace.

The model is trained briefly with SGD (batch 64) so the point is near a minimum.

Run: ``python benchmarks/diagnostics_speed.py [--threads 2] [--epochs 10]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from largebatch.diagnostics import (
    HessianOperator,
    epsilon_sharpness,
    fixed_subset,
    hutchinson_trace,
    top_eigenvalues,
)
from largebatch.tasks import get_task


def trained_model(task, epochs: int, batch_size: int = 64, lr: float = 0.05):
    """A model after ``epochs`` of SGD with momentum, seeded."""
    torch.manual_seed(0)
    model = task.build_model()
    inputs, targets = fixed_subset(task.train, batch_size=len(task.train))[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs), batch_size):
            rows = order[start : start + batch_size]
            optimizer.zero_grad()
            task.loss_fn(model(inputs[rows]), targets[rows]).backward()
            optimizer.step()
    return model


def timed(fn):
    """``fn()``, and a ``"wall s (CPU s)"`` string: CPU time is the fairer figure on a busy machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return (
        result,
        f"{time.perf_counter() - wall:.1f} s wall ({time.process_time() - cpu:.1f} s CPU)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = get_task("mnist1d-cnn")
    data = fixed_subset(task.train, batch_size=1024)  # the whole training set
    model = trained_model(task, args.epochs)
    num_params = sum(p.numel() for p in model.parameters())
    print(
        f"mnist1d-cnn: {num_params} parameters, {len(task.train)} training examples, "
        f"{args.threads} threads, {args.epochs} epochs of SGD"
    )

    operator = HessianOperator(model, task.loss_fn, data)
    reference, seconds = timed(
        lambda: top_eigenvalues(operator, tol=1e-10, max_products=200, seed=123)
    )
    print(
        f"reference top eigenvalue {reference.eigenvalues[0]:.6f} "
        f"({reference.num_products} products, converged={reference.converged}, {seconds})"
    )
    for seed in range(3):
        capped, seconds = timed(
            lambda s=seed: top_eigenvalues(operator, tol=1e-2, max_products=20, seed=s)
        )
        error = abs(capped.eigenvalues[0] - reference.eigenvalues[0]) / abs(
            reference.eigenvalues[0]
        )
        print(
            f"  seed {seed}: top eigenvalue {capped.eigenvalues[0]:.6f} in {capped.num_products} products "
            f"(converged={capped.converged}, residual {capped.residuals[0]:.2e}), "
            f"relative error {error:.1e}, {seconds}"
        )

    vector = torch.randn(operator.dim)
    _, product_seconds = timed(lambda: operator(vector))
    trace, trace_seconds = timed(lambda: hutchinson_trace(operator, num_probes=30))
    print(
        f"one Hessian-vector product: {product_seconds}; Hutchinson trace (30 probes) "
        f"{trace.trace:.2f} +- {trace.ci_high - trace.trace:.2f} in {trace_seconds}"
    )

    for subspace_dim in (None, 100):
        for epsilon in (1e-3, 5e-4):
            result, seconds = timed(
                lambda e=epsilon, p=subspace_dim: epsilon_sharpness(
                    model, task.loss_fn, data, epsilon=e, subspace_dim=p
                )
            )
            space = "full space" if subspace_dim is None else f"p = {subspace_dim}"
            print(
                f"sharpness ({space}, eps {epsilon:g}): {result.sharpness:.3f} in {seconds} "
                f"({result.num_iterations} iterations, {result.num_evaluations} loss+gradient evaluations)"
            )


if __name__ == "__main__":
    main()
