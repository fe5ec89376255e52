"""The kernels compute in their inputs' dtypes, with float32 statistics, whatever autocast region
they are called from.

Under ``torch.autocast`` a plain ``a @ b`` would run in the region's lower precision: the reference
backend (the executable spec) and the chunked backends' backward would then differ from the same
call outside it, and from each other. The public entry points and the fused backwards run with
autocast off; a caller's low-precision hidden states stay in their dtype, as outside autocast.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def outside_autocast(fn: Callable[P, R]) -> Callable[P, R]:
    """Runs ``fn`` with every enabled autocast region turned off (nothing to do outside one)."""

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        with _off("cuda"), _off("cpu"):
            return fn(*args, **kwargs)

    return wrapped


def _off(device: str):
    """The region turning ``device``'s autocast off where it is on (one for a device without autocast
    would warn); entered in a plain ``with``, which dynamo traces whole."""
    return torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else contextlib.nullcontext()
