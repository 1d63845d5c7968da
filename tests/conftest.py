"""Shared test settings: single-threaded torch (tests run in parallel workers) and a
generated-data cache inside the checkout, so tests never touch the user's home cache."""

import os
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault(
    "LARGEBATCH_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "test-data")
)
