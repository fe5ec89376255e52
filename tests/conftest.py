"""Test session set-up: the Triton interpreter where there is no GPU, and the shared fixtures
(helpers live in ``helpers.py``)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_inputs

# Without a GPU, Triton kernels run in its interpreter, which must be chosen before triton is
# first imported (importing torch does not import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def inputs():
    return make_inputs()
