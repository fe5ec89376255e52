"""Triton backend: fused token statistics, a fused row step for the chunked pipeline, decode combine.

- :func:`token_stats` (``fused.py``): the backend's ``token_stats`` contract, fully fused, no
  ``[N, V]`` tensor (logit tiles live on chip; the backward recomputes them).
- :func:`triton_row_step` (``row_step.py``): the ``chunked.RowStep`` contract in one kernel, and
  :func:`chunked_triton_token_stats`, the chunked pipeline (torch GEMMs) using it.
- :func:`combine_last` (``decode.py``): the customized policy's log-probs from held logits.

The kernels run on CUDA GPUs, or on CPU under Triton's interpreter when ``TRITON_INTERPRET=1`` is
set before triton is first imported (by anything: the kernels and triton.language's helpers are
built at import; slow, for tests). Inputs are float16, bfloat16 or float32.
"""

from __future__ import annotations

import functools

import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # the backend is optional: report why, never fail the package import
    _MISSING = f"triton cannot be imported ({exc})"
else:
    _MISSING = ""
    from .. import chunked
    from ._common import INTERPRET, interpreter_problem
    from .decode import combine_last
    from .fused import fused_token_stats, token_stats
    from .row_step import triton_row_step

    chunked_triton_token_stats = functools.partial(chunked.chunked_token_stats, row_step=triton_row_step)
    """``chunked.chunked_token_stats`` with the Triton row step (torch GEMMs, one fused kernel per chunk)."""


def backend_status() -> tuple[bool, str]:
    """Usable when triton imports and there is a CUDA GPU, or the kernels were built for the interpreter."""
    if _MISSING:
        return False, _MISSING
    if interpreter_problem():
        return False, interpreter_problem()
    if not (torch.cuda.is_available() or INTERPRET):
        return False, (
            "needs a CUDA GPU (or TRITON_INTERPRET=1, set before triton is first imported, to run on CPU)"
        )
    return True, ""


__all__ = [
    "backend_status",
    "chunked_triton_token_stats",
    "combine_last",
    "fused_token_stats",
    "token_stats",
    "triton_row_step",
]
