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

import torch

DEVICE_TYPES = ("cuda", "cpu")


def outside_autocast(fn):
    """Runs ``fn`` with every enabled autocast region turned off (nothing to do outside one)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        enabled = [device for device in DEVICE_TYPES if torch.is_autocast_enabled(device)]
        if not enabled:
            return fn(*args, **kwargs)
        with contextlib.ExitStack() as regions:
            for device in enabled:
                regions.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return wrapped
