"""Memory-bounded Q-Adapter token statistics: per chunk of tokens, two GEMMs, one row step, P @ Wq.

For the scored tokens only (packed to ``[N, d]``), each chunk computes the base logits ``z``
and the Q-values with matmuls, then the *row step* turns them into the per-token values the loss
needs (``Q[t, a_t]`` and the soft value ``V_t``) and the combined policy ``p_t``; finally
``E_p[Wq] = p @ Wq`` is stored (``[N, d]``). With it, the backward for ``q_hidden`` is
elementwise (docs/design.md, "The gradient in closed form"): no logits are kept or recomputed. Only a trainable
``q_weight`` / ``q_bias`` needs a second chunked pass. Peak extra memory: ``O(chunk * V + N * d)``.

The pieces live apart: the step contracts and the eager steps (``steps.py``), the tile engine and
its autograd Function (``tiles.py``), the sizing policy (``sizing.py``). The step is pluggable:
the eager one runs everywhere, the compiled C one on CPUs; the Triton and CUDA backends pass
fused single-pass row steps of the same contract.
"""

from __future__ import annotations

import torch

from . import _cpu
from .grad_filter import mass_budget
from .registry import Backend, StatsOptions
from .sizing import auto_chunk_size, auto_tiles, default_block_step
from .steps import RowStep, whole_row_block_step
from .tiles import ChunkedTokenStats


def chunked_token_stats(base: torch.Tensor, hq: torch.Tensor, weight: torch.Tensor, q_weight: torch.Tensor,
                        q_bias: torch.Tensor | None, targets: torch.Tensor, options: StatsOptions,
                        row_step: RowStep | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``token_stats`` contract (:class:`registry.TokenStatsFn`) over tiles.

    ``row_step``: a fused step over whole rows (the GPU backends'); ``None`` takes
    :func:`default_block_step` over :func:`auto_tiles` (vocabulary tiles on a CPU). Under a soft cap
    the step is unchanged and the gradients gain the factor ``1 - tanh^2`` (one more tile buffer).
    ``options.grad_filter_eps``: each token leaves its lightest blocks, up to that much
    probability, out of ``p @ Wq`` and ``dWq`` (``grad_filter.py``; the steps report each block's
    share of ``p``).
    """
    if not torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active():  # torch.func: grad, vmap
        raise RuntimeError("the chunked backends' fused backward is an autograd Function that torch.func's transforms "
                           "cannot run; backend='reference' computes under them (with a whole head)")
    vocab, softcap = weight.shape[0], options.logit_softcap
    if row_step is not None:
        # A fused step makes no float32 copies, a soft cap included (it caps as it reads).
        tiles = (options.chunk_size or auto_chunk_size(hq.shape[0], vocab, hq.dtype, hq.device, widened=False), vocab)
        block_step = whole_row_block_step(row_step)
    else:
        tiles = auto_tiles(hq.shape[0], vocab, hq.dtype, hq.device, options.chunk_size)
        block_step = default_block_step(hq.device)
    eps = mass_budget(options.grad_filter_eps, hq.dtype)
    return ChunkedTokenStats.apply(base.detach(), hq, weight.detach(), q_weight, q_bias, targets, tiles, block_step,
                                   (options.alpha_tilde, options.alpha_0, softcap, eps))


def _cpu_step_note() -> str:
    """On a CPU the backend is fastest with the compiled row step: where that step cannot be used,
    why, and that the eager step runs instead (asking builds it once, as its first use would)."""
    compiled, why_not = _cpu.status()
    return "" if compiled else f"on CPU the eager row step runs: the compiled one is unavailable ({why_not})"


BACKEND = Backend(
    name="chunked",
    summary="per tile of tokens x vocabulary: 2 GEMMs, the row step (compiled C on CPU), P @ Wq (gradient "
            "filtering optional); elementwise backward",
    token_stats=chunked_token_stats,
    availability=lambda: (True, ""),
    note=_cpu_step_note,
)
