"""Shampoo's step written block by block, one tensor at a time: the unbatched arithmetic.

No buckets, flat buffers, list operations or CUDA graphs: every parameter keeps its own
momentum, grafting state and step count, and every block its own statistics and roots,
updated with plain tensor operations in the order of the paper's practical algorithm.
The blocking and the inverse-root routine are the library's (tested on their own); the
root schedule (refresh every ``precondition_frequency`` group steps from a snapshot,
installed ``staleness`` steps later, the previous root kept on failure) is re-derived.
"""

from __future__ import annotations

import torch

from largebatch.optim.shampoo.blocking import plan_blocking
from largebatch.optim.shampoo.config import RootConfig
from largebatch.optim.shampoo.matrix_roots import inverse_roots


def _unfold(block: torch.Tensor, dim: int) -> torch.Tensor:
    return block.movedim(dim, 0).reshape(block.shape[dim], -1)


class ReferenceShampoo:
    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        lr: float,
        betas: tuple[float, float],
        epsilon: float,
        weight_decay: float,
        nesterov: bool,
        maximize: bool,
        grafting: tuple[str, float, float],  # (name, beta2, epsilon)
        block: int,
        max_preconditioned_dim: int,
        frequency: int,
        staleness: int,
        start: int,
        roots: RootConfig,
    ) -> None:
        self.params = params
        self.lr, self.betas, self.weight_decay = lr, betas, weight_decay
        self.nesterov, self.maximize = nesterov, maximize
        self.grafting = grafting
        self.frequency, self.staleness, self.start, self.roots = frequency, staleness, start, roots
        self.group_step, self.pending = 0, None
        self.state = []
        for p in params:
            blocking = plan_blocking("p", tuple(p.shape), block, max_preconditioned_dim)
            blocks = [
                {
                    "slices": b.slices,
                    "factors": [epsilon * torch.eye(n, dtype=p.dtype) for n in b.shape],
                    "roots": [torch.eye(n, dtype=p.dtype) for n in b.shape],
                    "snapshot": None,
                }
                for b in blocking.blocks
            ]
            self.state.append(
                {
                    "step": 0,
                    "momentum": torch.zeros_like(p),
                    "second_moment": torch.zeros_like(p),
                    "merged": blocking.merged_shape,
                    "blocks": blocks,
                }
            )

    def _grafted(self, state: dict, x: torch.Tensor) -> torch.Tensor:
        """The grafted update ``-lr * (bias-corrected x) / (sqrt(bias-corrected v) + eps)``."""
        name, beta2, eps = self.grafting
        beta1, t = self.betas[0], state["step"]
        power = t + 1 if self.nesterov else t
        corrected = x / (1.0 - beta1**power) if beta1 > 0 else x
        if name == "sgd":
            return -self.lr * corrected
        v = state["second_moment"]
        if name == "adam":
            v = v / (1.0 - beta2**t)
        return -self.lr * corrected / (v.sqrt() + eps)

    def _refresh(self, source: str) -> None:
        for state in self.state:
            for block in state["blocks"]:
                matrices = block[source] if source == "snapshot" else block["factors"]
                for dim, matrix in enumerate(matrices):
                    result = inverse_roots(matrix[None], 2 * len(matrices), self.roots)
                    if bool(result.ok[0]):
                        block["roots"][dim] = result.roots[0].to(matrix.dtype)

    @torch.no_grad()
    def step(self) -> None:
        active = [(p, s) for p, s in zip(self.params, self.state) if p.grad is not None]
        if not active:
            return
        self.group_step += 1
        step = self.group_step
        beta1, beta2 = self.betas
        name, graft_beta2, _ = self.grafting
        updates = []
        for p, state in active:
            state["step"] += 1
            g = -p.grad if self.maximize else p.grad.clone()
            x = g
            if beta1 > 0.0:
                m = state["momentum"]
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                x = (beta1 * m + (1.0 - beta1) * g) if self.nesterov else m
            v = state["second_moment"]
            if name == "adagrad":
                v.add_(g * g)
            elif name in ("adam", "rmsprop"):
                v.mul_(graft_beta2).add_(g * g, alpha=1.0 - graft_beta2)
            grafted = self._grafted(state, x)
            merged_g = g.reshape(state["merged"]) if state["blocks"] else None
            for block in state["blocks"]:
                g_b = merged_g[block["slices"]]
                for dim, factor in enumerate(block["factors"]):
                    unfolded = _unfold(g_b, dim)
                    product = unfolded @ unfolded.T
                    block["factors"][dim] = (
                        factor + product if beta2 == 1.0 else beta2 * factor + (1 - beta2) * product
                    )
            updates.append((p, state, x, grafted))

        # The root schedule: snapshot at multiples of F, install `staleness` steps later.
        if self.pending is not None and (
            step >= self.pending + self.staleness or step % self.frequency == 0
        ):
            self._refresh("snapshot")
            self.pending = None
        if step % self.frequency == 0:
            if self.staleness == 0:
                self._refresh("factors")
            else:
                for state in self.state:
                    for block in state["blocks"]:
                        block["snapshot"] = [f.clone() for f in block["factors"]]
                self.pending = step

        for p, state, x, grafted in updates:
            update = grafted
            if state["blocks"] and state["step"] >= self.start:
                update = torch.empty(state["merged"], dtype=p.dtype)
                merged_x = x.reshape(state["merged"])
                merged_d = grafted.reshape(state["merged"])
                for block in state["blocks"]:
                    direction = merged_x[block["slices"]]
                    for dim, root in enumerate(block["roots"]):
                        direction = torch.tensordot(root, direction, dims=([1], [dim])).movedim(
                            0, dim
                        )
                    d_norm = merged_d[block["slices"]].norm()
                    scale = d_norm / direction.norm().clamp_min(torch.finfo(p.dtype).tiny)
                    update[block["slices"]] = -scale * direction  # D carries -lr
                update = update.reshape(p.shape)
            p.mul_(1.0 - self.lr * self.weight_decay)
            p.add_(update)
