"""A base model handed to a :class:`~qadapter.library.model.QAdapterModel` or an
:class:`~qadapter.library.adapter_set.AdapterSet` is the caller's: PEFT injects its LoRA layers into
it in place (a copy would double the memory) and freezes its weights. Once the PEFT model made on it
here is gone, the base gets back what it had: its own layers where LoRA layers were put (an
AdapterSet's bank with them), no ``peft_config``, each weight's ``requires_grad``, a 4-bit CPU
layer's inference layout switch (training turns it off: quantization.py). Without that, a
base a trained adapter was built on went on decoding that adapter's policy as if it were the base,
and one an AdapterSet had served could neither run a forward nor take another AdapterSet.

While such a PEFT model lives, the base is its alone: a second one on it is refused, since PEFT
would inject into the same layers and overwrite the first one's adapter weights (a notebook that
trains a Q-Adapter and builds another on the same base would lose the trained one unsaid), unless
that model took its layers out itself (``unload()``). So is a
base carrying PEFT layers of the caller's own: PEFT would add the Q-Adapter to them and make it
their active adapter, and there is no plain base to give back.
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

from torch import nn

Wrapper = TypeVar("Wrapper", bound=nn.Module)


class _Loan:
    """What the base had before the PEFT model was made on it."""

    def __init__(self, base: nn.Module) -> None:
        self.had_config = "peft_config" in vars(base)
        self.requires_grad = {name: p.requires_grad for name, p in base.named_parameters()}
        self.cpu_packing = {name: m.support_avx512bf16_for_cpu for name, m in base.named_modules()
                            if hasattr(m, "support_avx512bf16_for_cpu")}


class BaseInUse(ValueError):
    """The base given carries PEFT layers: a PEFT model's made here that is still in use, or the caller's own."""


_LOANS: weakref.WeakKeyDictionary[nn.Module, _Loan] = weakref.WeakKeyDictionary()
_LOCK = threading.RLock()  # reentrant: a collection inside lend() runs the finalizers on this thread


def tuner_layer_names(model: nn.Module) -> list[str]:
    """The names of the outermost PEFT tuner layers (LoRA layers) in ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    return [name for name in names if not any(name.startswith(f"{other}.") for other in names)]


def lend(base: nn.Module, wrap: Callable[[], Wrapper]) -> Wrapper:
    """``wrap()`` (which makes a PEFT model on ``base``, injecting into it), with ``base`` given back
    as it was once that PEFT model is collected (or at once where ``wrap`` fails). Refused while
    ``base`` carries PEFT layers: another PEFT model's made here that lives, or the caller's own; a
    base whose PEFT model lives but took its layers out (``unload()``, ``merge_and_unload()``) is
    lent afresh."""
    with _LOCK:
        if base in _LOANS:
            gc.collect()  # an earlier one that is garbage in a cycle (an AdapterSet's) gives the base back first
        layers = tuner_layer_names(base)
        if layers and base in _LOANS:
            raise BaseInUse("base_model carries the LoRA layers of a QAdapterModel or AdapterSet still in use: "
                            "PEFT injects them into the base in place, so another one on it would overwrite that "
                            "one's adapter weights. Build this one on another copy of the base, or drop the one "
                            "in use first (del it; the base is then given back as it was)")
        if layers:
            raise BaseInUse(f"base_model carries PEFT layers of its own ({', '.join(layers[:3])}"
                            f"{', ...' if len(layers) > 3 else ''}): give the plain model (a PEFT model's "
                            "unload() gives it back), or a PEFT model whose adapter is the Q-function to "
                            "QAdapterModel.from_peft_model")
        if base in _LOANS:  # its PEFT model lives on without layers in it
            _give_back(base, _LOANS[base])
        loan = _LOANS[base] = _Loan(base)
        try:
            wrapper = wrap()
        except BaseException:
            _give_back(base, loan)
            raise
        weakref.finalize(wrapper, _returned, weakref.ref(base), loan).atexit = False
        return wrapper


def _returned(base_ref: weakref.ref, loan: _Loan) -> None:
    base = base_ref()
    if base is None:
        return
    with _LOCK:
        if _LOANS.get(base) is loan:  # not lent afresh since
            _give_back(base, loan)


def _give_back(base: nn.Module, loan: _Loan) -> None:
    for name in tuner_layer_names(base):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, base.get_submodule(name).get_base_layer())
    if not loan.had_config and "peft_config" in vars(base):
        del base.peft_config
    for name, param in base.named_parameters():
        if name in loan.requires_grad:
            param.requires_grad_(loan.requires_grad[name])
    for name, module in base.named_modules():
        if name in loan.cpu_packing:
            module.support_avx512bf16_for_cpu = loan.cpu_packing[name]
    _LOANS.pop(base, None)
