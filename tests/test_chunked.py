"""What is particular to the chunked pipeline (its agreement with the reference is in test_backends.py)."""

from __future__ import annotations

import torch

from qadapter_kernels.chunked import ChunkLogits, _chunks, auto_chunk_size


def test_auto_chunk_size_respects_budget():
    assert auto_chunk_size(10_000, 1000, torch.float32, torch.device("cpu"), budget=12_000 * 50) == 50
    assert auto_chunk_size(10, 1000, torch.float32, torch.device("cpu"), budget=2**40) == 10
    assert auto_chunk_size(10, 10**9, torch.bfloat16, torch.device("cpu"), budget=1) == 1


def test_chunks_are_even_and_cover_every_row():
    for n, chunk in [(1024, 227), (10, 3), (7, 7), (7, 100), (1, 1)]:
        spans = list(_chunks(n, chunk))
        sizes = [e - s for s, e in spans]
        assert [s for s, _ in spans] == [0] + [e for _, e in spans[:-1]] and sum(sizes) == n
        assert all(0 < k <= chunk for k in sizes) and max(sizes) - min(sizes) <= 1
    assert list(_chunks(0, 5)) == []
    assert [e - s for s, e in _chunks(1024, 227)] == [205, 205, 205, 205, 204]
    assert [e - s for s, e in _chunks(10, 3)] == [3, 3, 2, 2]


def test_chunk_logits_stack_a_shared_head_and_agree_with_two_gemms():
    g = torch.Generator().manual_seed(3)
    base, hq = torch.randn(2, 11, 8, generator=g)
    weight = torch.randn(13, 8, generator=g)
    separate = ChunkLogits(base, hq, weight, weight.clone(), None, chunk=4)
    shared = ChunkLogits(base, hq, weight.detach(), weight.detach(), None, chunk=4)
    assert shared.shared and not separate.shared
    for s, e in _chunks(11, 4):
        for got in (shared(s, e), separate(s, e)):  # each call overwrites the last chunk's buffer
            torch.testing.assert_close(got[0], base[s:e] @ weight.T)
            torch.testing.assert_close(got[1], hq[s:e] @ weight.T)
    bias = torch.randn(13, generator=g)
    with_bias = ChunkLogits(base, hq, weight, weight, bias, chunk=4)
    assert not with_bias.shared
    torch.testing.assert_close(with_bias(4, 8)[1], hq[4:8] @ weight.T + bias)
