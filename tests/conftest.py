"""Shared test settings: deterministic, single-threaded torch (tests run in parallel)."""

import torch

torch.set_num_threads(1)
