"""The Triton backend: the chunked pipeline with a fused row step, and the decode combine.

- ``CHUNKED_BACKEND`` ("chunked-triton"): ``chunked.chunked_token_stats`` with
  :func:`triton_row_step` (``row_step.py``): torch GEMMs per chunk, one fused kernel between them
  (docs/architecture.md, "Choosing a backend").
- :func:`combine_logits` (``decode.py``): the customized policy's log-probs from held logits.

The kernels run on CUDA GPUs, or on CPU under Triton's interpreter when ``TRITON_INTERPRET=1`` is
set before triton is first imported (by anything: the kernels and triton.language's helpers are
built at import; slow, for tests). Inputs are float16, bfloat16 or float32. Importing this package
without triton installed raises ImportError, which the registry reports as the reason.
"""

from __future__ import annotations

import functools

import torch

from .. import chunked
from ..registry import Backend
from ._common import INTERPRET, interpreter_problem
from .decode import combine_logits
from .row_step import triton_row_step

chunked_triton_token_stats = functools.partial(chunked.chunked_token_stats, row_step=triton_row_step)
"""``chunked.chunked_token_stats`` with the Triton row step (torch GEMMs, one fused kernel per chunk)."""


def backend_status() -> tuple[bool, str]:
    """Usable where there is a CUDA GPU, or where the kernels were built for the interpreter."""
    if interpreter_problem():
        return False, interpreter_problem()
    if not (torch.cuda.is_available() or INTERPRET):
        return False, (
            "needs a CUDA GPU (or TRITON_INTERPRET=1, set before triton is first imported, to run on CPU)"
        )
    return True, ""


CHUNKED_BACKEND = Backend(
    name="chunked-triton",
    summary="chunked pipeline with the Triton row step (one kernel per chunk)",
    token_stats=chunked_triton_token_stats,
    availability=backend_status,
    float64=False,
    combine=combine_logits,
)

__all__ = [
    "CHUNKED_BACKEND",
    "backend_status",
    "chunked_triton_token_stats",
    "combine_logits",
    "triton_row_step",
]
