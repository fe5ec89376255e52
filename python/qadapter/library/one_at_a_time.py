"""One call at a time on a network: what a customized policy and the loss's passes run sets state on
the shared transformers model (each row's LoRA scaling, adapters disabled for the frozen pass, a hook
on the decoder, the bank's selection), so two calls that overlap from two threads (a web app's
workers) would read each other's and decode, or score, with another's adapter. Every entry point
that sets such state holds the network's lock for its call; calls on one thread nest freely (the lock
is reentrant), and a traced region (``torch.compile``) takes none. A training step's backward runs
after its forward let go (and recomputes checkpointed passes with whatever the network holds then):
training and decoding from two threads at once is not covered.

The lock belongs to the transformers model itself (kept beside it, not on it: a module keeps
pickling and deep-copying), so every wrapper over one base shares it.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MAKING = threading.Lock()
Method = TypeVar("Method", bound=Callable)


def network_lock(model: nn.Module) -> threading.RLock:
    """The lock of the transformers model ``model`` is (or that a PEFT model wraps)."""
    network = model.get_base_model() if hasattr(model, "get_base_model") else model
    lock = _LOCKS.get(network)
    if lock is None:  # made once, under a lock of its own: two first calls get one lock
        with _MAKING:
            lock = _LOCKS.setdefault(network, threading.RLock())
    return lock


def held(model: nn.Module) -> contextlib.AbstractContextManager:
    """What a call holds for its run: the network's lock, or nothing in a traced region (one traced
    step of a call that holds it already)."""
    return contextlib.nullcontext() if torch.compiler.is_compiling() else network_lock(model)


def one_call_at_a_time(network_of: Callable[[object], nn.Module]) -> Callable[[Method], Method]:
    """Decorates a method to run holding (:func:`held`) the network ``network_of(self)`` names."""
    def decorate(method: Method) -> Method:
        @functools.wraps(method)
        def holding(self, *args, **kwargs):
            with held(network_of(self)):
                return method(self, *args, **kwargs)
        return holding  # type: ignore[return-value]
    return decorate
