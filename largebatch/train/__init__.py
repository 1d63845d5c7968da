"""The training engine: ``train(RunConfig) -> RunResult``, data-parallel and resumable.

``validate`` checks a config up front (the CLI and sweeps call it before launching);
``plan_run`` resolves it into concrete steps, learning rate and schedule.
"""

from largebatch.train.config import RunConfig, RunResult
from largebatch.train.loop import train
from largebatch.train.plan import RunPlan, plan_run, validate

__all__ = ["RunConfig", "RunPlan", "RunResult", "plan_run", "train", "validate"]
