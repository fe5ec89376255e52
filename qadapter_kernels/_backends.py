"""Backend registry: what each backend needs, whether it is usable here, and the ``auto`` choice.

Every backend but ``reference`` implements one contract, ``token_stats``: from the packed scored
tokens it returns ``(Q[t, a_t], V_t)`` with gradients to ``q_hidden``, ``q_weight`` and ``q_bias``
(see ``chunked.chunked_token_stats`` for the signature). The loss around it (rewards, pairing, BT,
chi2) is shared, in ``_contract.py``. Each backend module exposes ``backend_status()`` and
``token_stats``; modules are imported lazily so a missing optional dependency only disables its
backend, with the reason.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

from ._contract import check_choice, pairwise_loss

_MODULES = {
    "reference": ".reference",
    "chunked": ".chunked",
    "triton": ".triton",
    "chunked-triton": "._chunked_triton",
    "cuda": "._cuda",
}
BACKEND_NAMES = ("auto", *_MODULES)
# What "auto" tries, fastest first, per device type, as measured on an H200 (docs/architecture.md,
# "Choosing a backend"): chunked-triton and cuda train at 1.2-1.4x T_gemm3 (within each other's
# run-to-run spread; chunked-triton needs no compiled extension), chunked at 1.9-2.0x. The fully
# fused "triton" backend (8-9x: its backward re-reads and re-writes E_p[Wq] per vocabulary tile)
# is never chosen automatically; it is there to be asked for.
_AUTO_ORDER = {"cuda": ("chunked-triton", "cuda", "chunked")}
_AUTO_DEFAULT = ("chunked",)


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here and, when it cannot, why."""

    name: str
    available: bool
    reason: str = ""


def _module(name: str):
    return importlib.import_module(_MODULES[name], __package__)


def status(name: str) -> BackendStatus:
    try:
        available, reason = _module(name).backend_status()
    except ImportError as exc:  # an optional dependency of that backend is missing
        return BackendStatus(name, False, f"cannot import it: {exc}")
    return BackendStatus(name, available, reason)


def backends() -> dict[str, BackendStatus]:
    """Each backend's availability on this machine and, for a missing one, the reason."""
    return {name: status(name) for name in _MODULES}


def check_name(name: str) -> str:
    return check_choice("backend", name, BACKEND_NAMES)


# Backends whose kernels compute in float32 at most: "auto" keeps float64 inputs off them.
_NO_FLOAT64 = ("triton", "chunked-triton")


def resolve(name: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The concrete backend for ``name`` on ``device`` (and input ``dtype``); raises if it cannot run."""
    check_name(name)
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, _AUTO_DEFAULT):
            if dtype == torch.float64 and candidate in _NO_FLOAT64:
                continue
            if status(candidate).available:
                return candidate
        return "chunked"
    st = status(name)
    if not st.available:
        raise RuntimeError(f"backend {name!r} is not available: {st.reason}")
    return name


def token_stats_fn(name: str) -> Callable:
    return _module(name).token_stats


def pairwise_fn(name: str) -> Callable:
    """The backend's fused pairwise loss (signature of ``_contract.pairwise_loss``), else the shared one."""
    return getattr(_module(name), "pairwise_bt", pairwise_loss)
