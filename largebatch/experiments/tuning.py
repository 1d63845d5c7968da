"""Per-cell learning-rate tuning, after Shallue et al. (2019), with a grid that never leaves the best value at its edge.

For every (optimizer, batch size) cell of a sweep, a log-spaced grid of base
learning rates runs with the first seed; the best on the validation split
(:func:`~largebatch.experiments.analysis.selection_score`, ties by
:func:`~largebatch.experiments.analysis.choose`) is chosen. If it sits at an edge
of the grid, the grid is extended past that edge by its own ratio and the new
value is tried, until the best value is interior or ``max_extensions`` values
have been added (then the choice is reported as "at the edge"). If no value of
the grid succeeded, the grid is extended downwards (too large a step is the
usual cause). Then the remaining seeds run at the chosen value, for mean ± std.

The protocol is a pure function of what has been measured (:func:`settle`), so
a tuning can be replayed from a results database at any time: that is how a
study resumes after a kill, and how its report knows what was chosen.
:func:`tune` runs the same protocol on a plain function ``lr -> loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from largebatch.experiments.analysis import Score, choose
from largebatch.utils.errors import ConfigError

#: a score for a learning rate whose run failed (worse than any successful one)
FAILED: Score = (0, -math.inf)


@dataclass(frozen=True)
class TuningState:
    """Where the tuning of one cell stands, replayed from the scores measured so far.

    Attributes:
        grid: the learning rates the protocol has asked for so far, ascending.
        missing: those of ``grid`` without a score yet (run them, then settle again).
        chosen: the chosen learning rate, once settled (``None`` while values are missing).
        at_edge: ``"low"``/``"high"`` if the chosen value is at that edge of the grid
            (only possible when the extensions ran out), else ``None``.
        extensions: how many values were added beyond the initial grid.
    """

    grid: tuple[float, ...]
    missing: tuple[float, ...]
    chosen: float | None
    at_edge: str | None
    extensions: int

    @property
    def settled(self) -> bool:
        return not self.missing


def grid_ratio(grid: Sequence[float]) -> float:
    """The factor between neighbouring values of a log-spaced grid (from its ends)."""
    low, high = min(grid), max(grid)
    return (high / low) ** (1 / (len(grid) - 1))


def check_grid(grid: Sequence[float]) -> None:
    """``ConfigError`` unless ``grid`` holds at least two distinct positive values."""
    if len(set(grid)) < 2 or any(not lr > 0 for lr in grid):
        raise ConfigError(f"Invalid learning-rate grid: {list(grid)} (need two or more values > 0)")


def settle(
    grid: Sequence[float], scores: Mapping[float, Score], max_extensions: int = 3
) -> TuningState:
    """Replay the protocol on the ``scores`` known so far (``lr -> score``, higher is better).

    Extension values are computed the same way every time (``min / ratio`` or
    ``max * ratio`` of the grid so far), so they are the exact floats measured
    before and a replay finds their scores.
    """
    check_grid(grid)
    if max_extensions < 0:
        raise ConfigError(f"Invalid max_extensions: {max_extensions} (must be >= 0)")
    lrs = sorted(set(grid))
    ratio = grid_ratio(lrs)
    extensions = 0
    while True:
        missing = tuple(lr for lr in lrs if lr not in scores)
        if missing:
            return TuningState(tuple(lrs), missing, None, None, extensions)
        known = {lr: scores[lr] for lr in lrs}
        if max(known.values())[0] == 0:  # nothing succeeded: step down
            edge, chosen = "low", lrs[0]
        else:
            chosen = choose(known)
            edge = "low" if chosen == lrs[0] else "high" if chosen == lrs[-1] else None
        if edge is None or extensions == max_extensions:
            return TuningState(tuple(lrs), (), chosen, edge, extensions)
        lrs = [lrs[0] / ratio, *lrs] if edge == "low" else [*lrs, lrs[-1] * ratio]
        extensions += 1


def tune(
    loss: Callable[[float], float], grid: Sequence[float], max_extensions: int = 3
) -> TuningState:
    """Run the protocol on ``loss(lr)`` (lower is better; non-finite counts as failed)."""
    scores: dict[float, Score] = {}
    while not (state := settle(grid, scores, max_extensions)).settled:
        for lr in state.missing:
            value = loss(lr)
            scores[lr] = (1, -value) if math.isfinite(value) else FAILED
    return state
