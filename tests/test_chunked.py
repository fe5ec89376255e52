"""What is particular to the chunked pipeline (its agreement with the reference is in test_backends.py)."""

from __future__ import annotations

import torch

from qadapter_kernels.chunked import auto_chunk_size


def test_auto_chunk_size_respects_budget():
    assert auto_chunk_size(10_000, 1000, torch.float32, torch.device("cpu"), budget=12_000 * 50) == 50
    assert auto_chunk_size(10, 1000, torch.float32, torch.device("cpu"), budget=2**40) == 10
    assert auto_chunk_size(10, 10**9, torch.bfloat16, torch.device("cpu"), budget=1) == 1
