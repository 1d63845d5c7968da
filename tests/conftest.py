"""Shared test settings: single-threaded torch (tests run in parallel workers), a
generated-data cache inside the checkout, so tests never touch the user's home cache, and,
without a GPU, Triton's CPU interpreter for the fused optimizer kernels (it must be on
before anything imports Triton; ``torch._dynamo`` does)."""

import os
from pathlib import Path

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault(
    "LARGEBATCH_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "test-data")
)
