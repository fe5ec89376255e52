"""How big a tile is: tokens per chunk from a memory budget, vocabulary columns per CPU tile from
the last-level cache, and which step serves a device (the compiled CPU step where it builds)."""

from __future__ import annotations

import torch

from . import _cpu
from .inputs import stats_dtype
from .steps import BlockStep, torch_block_step

DEFAULT_CPU_BUDGET = 128 * 2**20
DEFAULT_CUDA_BUDGET = 1 * 2**30


# Tokens per CPU tile: from about 2048 rows of [h_b; h_q] by a few thousand vocabulary columns the
# GEMMs run at their peak, faster than thin whole-vocabulary chunks or one tall GEMM
# (docs/architecture.md, "chunked"; the timings are in bench/results/).
CPU_TILE_ROWS = 1024


def _compiled_cpu(device: torch.device):
    """The module of the compiled single-sweep step (``_cpu.py``) when it serves tensors on
    ``device`` (a CPU, and the step builds), else None."""
    if device.type != "cpu":
        return None
    return _cpu if _cpu.status()[0] else None


def default_block_step(device: torch.device) -> BlockStep:
    """The compiled single-sweep block step for CPU tensors when it builds, else the eager one."""
    compiled = _compiled_cpu(device)
    return compiled.cpu_block_step if compiled else torch_block_step


def auto_chunk_size(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device, budget: int | None = None,
                    *, widened: bool = True) -> int:
    """Largest chunk whose ``[chunk, V]`` buffers fit the budget.

    ``widened`` (the eager step, which widens half-precision tiles to float32): the
    GEMM outputs ``z`` and ``q``, their two float32 copies and ``P`` in the input dtype. Otherwise
    (the fused Triton and CUDA row steps, which read half precision and compute in registers):
    ``z``, ``q`` and one float32 ``P``, the most a fused step writes (the forward writes ``P`` over
    ``q``; the backward of a trainable Q head takes a float32 ``P``).
    """
    if budget is None:
        budget = DEFAULT_CUDA_BUDGET if device.type == "cuda" else DEFAULT_CPU_BUDGET
    return max(1, min(n_tokens, budget // chunk_row_bytes(vocab, dtype, widened=widened)))


def chunk_row_bytes(vocab: int, dtype: torch.dtype, *, widened: bool = True) -> int:
    """Bytes of one token's ``[V]`` buffers in a chunk (:func:`auto_chunk_size` says which)."""
    esize = torch.finfo(dtype).bits // 8
    stats = torch.finfo(stats_dtype(dtype)).bits // 8
    if widened:
        return vocab * (3 * esize + (2 * stats if stats != esize else 0))
    return vocab * (2 * esize + stats)


def cpu_tile_columns(rows: int, vocab: int, dtype: torch.dtype, cache_bytes: int, widened: bool = False) -> int:
    """Vocabulary entries per CPU tile: the tile's ``[2 rows, columns]`` GEMM output (and, ``widened``,
    the float32 copies of both that the eager step makes of half-precision tiles) fills the
    last-level cache, so the step and ``p @ Wq`` read it from there, not from memory (at least 256
    columns). Sized without the copies, the eager step's bfloat16 tiles spill out of the cache."""
    esize, stats = torch.finfo(dtype).bits // 8, torch.finfo(stats_dtype(dtype)).bits // 8
    entry = 2 * esize + (2 * stats if widened and stats != esize else 0)
    return max(1, min(vocab, max(256, cache_bytes // (rows * entry))))


def auto_tiles(n_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device,
               chunk_size: int | None = None) -> tuple[int, int]:
    """``(rows, columns)`` of a tile. On a CPU, :data:`CPU_TILE_ROWS` tokens (or ``chunk_size``) by
    :func:`cpu_tile_columns` of the vocabulary; elsewhere whole rows, as many as the memory budget
    allows (:func:`auto_chunk_size`)."""
    if device.type != "cpu":
        return chunk_size or auto_chunk_size(n_tokens, vocab, dtype, device), vocab
    rows = max(1, min(n_tokens, chunk_size or CPU_TILE_ROWS))
    compiled = _compiled_cpu(device) is not None and dtype in _cpu.DTYPES
    return rows, cpu_tile_columns(rows, vocab, dtype, _cpu.last_level_cache_bytes(), widened=not compiled)
