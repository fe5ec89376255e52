"""Triton kept-blocks products: ``p @ w`` (and ``dWq``) over the (token, block) pairs gradient filtering keeps.

Gradient filtering (``grad_filter.py``) lets each token leave its own lightest blocks of
``FILTER_BLOCK`` vocabulary columns out of ``E_p[Wq] = p @ Wq``; tokens keep different blocks, so
the product is grouped, as a mixture of experts is: every block is an expert whose tokens are the
ones that keep it. On a CPU the tile engine runs one GEMM per block over its tokens' gathered rows.
On a GPU that is a host sync and three launches per block (126 at the Llama-3 vocabulary), longer
than the GEMM it saves; a block left out of a whole tile of tokens is rare in real text (a token's
kept blocks differ from its neighbours'), so skipping tiles of a dense GEMM saves little either.

This kernel is the grouped GEMM in one launch: the tokens that keep each block are listed first (a
stable sort of the drop mask, on the device), and one program per (block, tile of its tokens, tile
of ``d``) gathers its tokens' rows of ``p``, multiplies them by the block's rows of ``w`` on the
tensor cores and adds the result into its tokens' rows of the output with float32 atomics (so the
order of the sums, not their terms, varies from run to run). Only tiles that hold a token are
launched: one host sync per call reads how many there are.

A trainable Q head's ``dWq = g^T @ h`` filters the same way (:func:`kept_blocks_head_product_`):
there each program owns a tile of head rows of one block and runs over the tokens that keep it, so
it needs neither atomics nor a sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..steps import FILTER_BLOCK
from ._common import INTERPRET, check_kernel_inputs, launch_guard, row_major

NUM_WARPS = 4
NUM_STAGES = 3


def tile_sizes(dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_M tokens, BLOCK_D output columns, BLOCK_K vocabulary entries per step)``. float32
    halves BLOCK_K, so that three pipeline stages stay within 99 KB of shared memory (sm_86/89/120);
    the interpreter's are small, so that tests cross several tiles with small shapes."""
    if INTERPRET:
        return 16, 32, 16
    return (64, 128, 32) if dtype == torch.float32 else (64, 128, 64)


@triton.jit
def _kept_blocks_product_kernel(
    p_ptr, w_ptr, out_ptr, tokens_ptr, counts_ptr, tile_block_ptr, tile_first_ptr,
    C, V, D, stride_p, stride_w, stride_out,
    FILTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    block = tl.load(tile_block_ptr + tile)
    m = tl.load(tile_first_ptr + tile) + tl.arange(0, BLOCK_M)
    in_m = m < tl.load(counts_ptr + block)
    tokens = tl.load(tokens_ptr + block.to(tl.int64) * C + m, mask=in_m, other=0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for offset in range(0, FILTER, BLOCK_K):
        k = block.to(tl.int64) * FILTER + offset + tl.arange(0, BLOCK_K)
        in_k = k < V
        a = tl.load(p_ptr + tokens[:, None] * stride_p + k[None, :], mask=in_m[:, None] & in_k[None, :], other=0.0)
        b = tl.load(w_ptr + k[:, None] * stride_w + cols[None, :], mask=in_k[:, None] & in_d[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.atomic_add(out_ptr + tokens[:, None] * stride_out + cols[None, :], acc, mask=in_m[:, None] & in_d[None, :],
                  sem="relaxed")


def kept_blocks_product(p: torch.Tensor, w: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """``p @ w`` in float32 with each row's dropped blocks left out.

    ``p``: ``[C, Vt]``; ``w``: ``[Vt, d]`` of ``p``'s dtype (float16, bfloat16 or float32);
    ``dropped``: ``[C, ceil(Vt / FILTER_BLOCK)]`` bool, the blocks of ``FILTER_BLOCK`` columns each
    row leaves out (``grad_filter.dropped_blocks``). Returns ``[C, d]`` float32. One host sync: the
    number of (block, token tile) pairs, which sizes the grid.
    """
    check_kernel_inputs("kept-blocks product", p, w)
    rows, width = p.shape
    if w.shape[0] != width or w.dtype != p.dtype:
        raise ValueError(f"w must be [{width}, d] in {p.dtype}; got {tuple(w.shape)} {w.dtype}")
    tokens, counts = _kept_tokens(dropped, rows, width)
    blocks = counts.shape[0]
    p, w = row_major(p), row_major(w)
    block_m, block_d, block_k = tile_sizes(p.dtype)
    out = torch.zeros(rows, w.shape[1], dtype=torch.float32, device=p.device)
    # One program per (block, BLOCK_M of the rows that keep it) that has any, by the block it serves
    # and its first row.
    tiles_per_block = (counts + block_m - 1) // block_m
    tiles = int(tiles_per_block.sum())
    if not tiles or not w.shape[1]:
        return out
    tile_block = torch.repeat_interleave(torch.arange(blocks, dtype=torch.int32, device=p.device), tiles_per_block,
                                         output_size=tiles)
    tile_first = block_m * (torch.arange(tiles, dtype=torch.int32, device=p.device)
                            - (tiles_per_block.cumsum(0, dtype=torch.int32) - tiles_per_block)[tile_block])
    with launch_guard(p):
        _kept_blocks_product_kernel[(tiles, triton.cdiv(w.shape[1], block_d))](
            p, w, out, tokens, counts, tile_block, tile_first,
            rows, width, w.shape[1], p.stride(0), w.stride(0), out.stride(0),
            FILTER=FILTER_BLOCK, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_K=block_k,
            PRECISION=float32_precision(), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
        )
    return out


@triton.jit
def _kept_blocks_head_kernel(
    g_ptr, h_ptr, out_ptr, tokens_ptr, counts_ptr,
    C, V, D, stride_g, stride_h, stride_out,
    FILTER: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block = tl.program_id(0) // (FILTER // BLOCK_N)
    count = tl.load(counts_ptr + block)
    if count == 0:
        return
    n = block.to(tl.int64) * FILTER + (tl.program_id(0) % (FILTER // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = n < V
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = cols < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(0, count, BLOCK_K):
        m = start + tl.arange(0, BLOCK_K)
        in_m = m < count
        tokens = tl.load(tokens_ptr + block.to(tl.int64) * C + m, mask=in_m, other=0).to(tl.int64)
        g = tl.load(g_ptr + tokens[:, None] * stride_g + n[None, :], mask=in_m[:, None] & in_n[None, :], other=0.0)
        h = tl.load(h_ptr + tokens[:, None] * stride_h + cols[None, :], mask=in_m[:, None] & in_d[None, :], other=0.0)
        acc = tl.dot(tl.trans(g), h.to(tl.float32), acc, input_precision=PRECISION)
    out = out_ptr + n[:, None] * stride_out + cols[None, :]
    mask = in_n[:, None] & in_d[None, :]
    tl.store(out, tl.load(out, mask=mask) + acc, mask=mask)


def kept_blocks_head_product_(out: torch.Tensor, g: torch.Tensor, h: torch.Tensor, dropped: torch.Tensor) -> None:
    """``out += g^T @ h`` with each row's dropped blocks of ``g`` left out: a trainable Q head's
    ``dWq`` over a tile (``g = dL/dQ``).

    ``out``: ``[Vt, d]`` float32, row-major; ``g``: ``[C, Vt]`` float32; ``h``: ``[C, d]`` (float16,
    bfloat16 or float32); ``dropped`` as :func:`kept_blocks_product` takes it. One program per
    (``BLOCK_N`` columns of a block, ``BLOCK_D`` of ``d``) runs over the rows that keep the block,
    so each owns its tile of ``out`` (no atomics: the result is the same every run). The product
    is float32 (TF32 on the tensor cores for half-precision ``h``, finer than ``g`` rounded to
    ``h``'s dtype, and without float16's underflow of ``g``; for float32 ``h`` as
    :func:`float32_precision` says).
    """
    check_kernel_inputs("kept-blocks head product", g, h, out)
    rows, width = g.shape
    if g.dtype != torch.float32 or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise TypeError(f"g and out must be float32 (out row-major); got {g.dtype} and {out.dtype}")
    if tuple(out.shape) != (width, h.shape[1]) or h.shape[0] != rows:
        raise ValueError(f"out must be [{width}, d] and h [{rows}, d]; got {tuple(out.shape)} and {tuple(h.shape)}")
    tokens, counts = _kept_tokens(dropped, rows, width)
    blocks = counts.shape[0]
    g, h = row_major(g), row_major(h)
    block_n, block_d, block_k = head_tile_sizes()
    if rows and width and h.shape[1]:
        with launch_guard(g):
            _kept_blocks_head_kernel[(blocks * (FILTER_BLOCK // block_n), triton.cdiv(h.shape[1], block_d))](
                g, h, out, tokens, counts,
                rows, width, h.shape[1], g.stride(0), h.stride(0), out.stride(0),
                FILTER=FILTER_BLOCK, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k,
                PRECISION=float32_precision() if h.dtype == torch.float32 else "tf32",
                num_warps=NUM_WARPS, num_stages=NUM_STAGES,
            )


def float32_precision() -> str:
    """A float32 ``tl.dot``'s precision as ``torch.mm``'s follows ``torch.get_float32_matmul_precision()``:
    IEEE at ``"highest"`` (torch's default), TF32 otherwise. Half-precision operands ignore it."""
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def head_tile_sizes() -> tuple[int, int, int]:
    """``(BLOCK_N head rows, BLOCK_D columns, BLOCK_K tokens per step)`` of the head product (float32
    operands: three stages in 72 KB of shared memory); small in the interpreter."""
    return (16, 32, 16) if INTERPRET else (64, 128, 32)


def _kept_tokens(dropped: torch.Tensor, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the rows that keep it first, in row order (``[blocks, C]`` int32), and how many
    (``[blocks]`` int32): a stable sort of the drop mask on its device, no host sync. ``dropped`` is
    checked to be the bool ``[rows, ceil(width / FILTER_BLOCK)]`` mask of a ``[rows, width]`` tile."""
    blocks = -(-width // FILTER_BLOCK)
    if dropped.dtype != torch.bool or tuple(dropped.shape) != (rows, blocks):
        raise ValueError(f"dropped must be a bool [{rows}, {blocks}] mask; got {dropped.dtype} {tuple(dropped.shape)}")
    tokens = torch.argsort(dropped.T.to(torch.uint8), dim=1, stable=True).to(torch.int32).contiguous()
    return tokens, (~dropped).sum(dim=0, dtype=torch.int32)
