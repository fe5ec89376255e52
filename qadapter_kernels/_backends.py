"""Backend registry: what each backend needs, whether it is usable here, and the ``auto`` choice.

Every backend but ``reference`` implements one contract, ``token_stats``: from the packed scored
tokens it returns ``(Q[t, a_t], V_t)`` with gradients to ``q_hidden``, ``q_weight`` and ``q_bias``.
The loss around it (rewards, pairing, BT, chi2) is shared, in ``_contract.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._contract import check_choice
from .chunked import chunked_token_stats

BACKEND_NAMES = ("auto", "reference", "chunked")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here and, when it cannot, why."""

    name: str
    available: bool
    reason: str = ""


@dataclass(frozen=True)
class _Backend:
    token_stats: Callable | None  # None for the reference, which computes the whole loss itself
    status: Callable[[], BackendStatus]


def _always(name: str) -> Callable[[], BackendStatus]:
    return lambda: BackendStatus(name, True)


_REGISTRY: dict[str, _Backend] = {
    "reference": _Backend(None, _always("reference")),
    "chunked": _Backend(chunked_token_stats, _always("chunked")),
}


def backends() -> dict[str, BackendStatus]:
    """Each backend's availability on this machine and, for a missing one, the reason."""
    return {name: backend.status() for name, backend in _REGISTRY.items()}


def check_name(name: str) -> str:
    return check_choice("backend", name, BACKEND_NAMES)


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for ``name`` on ``device``; raises if it cannot run."""
    check_name(name)
    if name == "auto":
        return "chunked"
    status = _REGISTRY[name].status()
    if not status.available:
        raise RuntimeError(f"backend {name!r} is not available: {status.reason}")
    return name


def token_stats_fn(name: str) -> Callable:
    return _REGISTRY[name].token_stats
