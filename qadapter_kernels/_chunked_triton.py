"""The ``chunked-triton`` backend: the chunked pipeline (torch GEMMs) with the Triton row step.

Per chunk of tokens, two cuBLAS GEMMs write the ``[C, V]`` logits, one Triton launch turns them
into ``(Q[t, a_t], V_t, p)`` (``triton/row_step.py``) and a third GEMM forms ``E_p[Wq]``. It moves
about ``6 * N * V * 2`` bytes at bf16, against the fully fused kernels' read-modify-write of
``E_p[Wq]`` per vocabulary tile, so on large vocabularies it is the faster of the two Triton
paths (docs/architecture.md, "Choosing a backend"). Available wherever the Triton backend is.
"""

from __future__ import annotations

from . import triton as _triton


def backend_status() -> tuple[bool, str]:
    return _triton.backend_status()


def token_stats(*args, **kwargs):
    """``chunked.chunked_token_stats`` with ``row_step=triton_row_step``."""
    return _triton.chunked_triton_token_stats(*args, **kwargs)
