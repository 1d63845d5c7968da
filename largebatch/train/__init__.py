"""The training engine: ``train(RunConfig) -> RunResult``, data-parallel and resumable.

A :class:`RunConfig` checks itself when built; ``plan_run`` resolves it against a
task into concrete steps, learning rate and schedule; ``launch`` runs it in
several worker processes on this machine.
"""

from largebatch.train.config import RunConfig, RunResult
from largebatch.train.launch import launch
from largebatch.train.loop import train
from largebatch.train.plan import RunPlan, plan_run

__all__ = ["RunConfig", "RunPlan", "RunResult", "launch", "plan_run", "train"]
