"""The chunked backend's peak extra memory is O(chunk * V + N * d); the reference's grows with N * V.

The measure is ``bench.memory.peak_extra_memory``, imported from bench on purpose: it is the one
shared tool of the benchmarks (harness, e2e, gpu_check) and of this test, kept in one copy so that
the suite checks with exactly what the benchmarks report. It is the only thing tests outside
bench's own tests take from bench; ``test_profiler_measure_sees_allocations`` tests it here.
"""

from __future__ import annotations

import torch
from helpers import make_inputs

from bench.memory import peak_extra_memory
from qadapter_kernels import qadapter_loss

VOCAB, HIDDEN, CHUNK = 4096, 64, 32


def peak_fwd_bwd(x, backend):
    def step():
        qadapter_loss(**x, backend=backend, chunk_size=CHUNK).loss.backward()

    return peak_extra_memory(step)[1]


def test_chunked_peak_memory_is_bounded_by_chunk_not_tokens():
    row_bytes = 4 * VOCAB  # one fp32 row of logits
    for seq in (128, 512):
        x = make_inputs(batch=4, seq=seq, hidden=HIDDEN, vocab=VOCAB, prompt_only_row=False)
        tokens = 4 * (seq - 1)
        chunked = peak_fwd_bwd(x, "chunked")
        reference = peak_fwd_bwd(x, "reference")
        # A few [chunk, V] buffers plus a handful of packed [N, d] tensors, never [N, V].
        assert chunked <= 4 * CHUNK * row_bytes + 10 * tokens * HIDDEN * 4, (seq, chunked)
        # The reference holds several fp32 [N, V] tensors.
        assert reference >= 2 * tokens * row_bytes, (seq, reference)
        assert chunked < reference / 10


def test_profiler_measure_sees_allocations():
    """The CPU measure itself: a 4 MB tensor alive beside another 4 MB one peaks at 8 MB."""

    def f():
        a = torch.randn(1024, 1024)
        b = a * 2
        del a
        return (b + 1).sum()

    _, peak = peak_extra_memory(f)
    assert 8 * 2**20 <= peak < 9 * 2**20
