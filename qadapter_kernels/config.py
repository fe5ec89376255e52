"""The loss options: one validated, frozen record whose fields and defaults every entry point uses.

``qadapter_loss``, ``QAdapterLoss``, the combine functions, the model layer (``QAdapterModel``,
``QAdapterConfig``), the command line and the benchmarks all take the options and their defaults
from :class:`LossConfig`; a default is written here and nowhere else. The meaning of each option
is in docs/design.md ("The method").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass, field

import torch

VALUE_AT = ("current", "next")
AUTO = "auto"  # grad_filter_eps: a probability budget per input dtype (grad_filter.mass_budget)
REWARD_NORM = ("padded", "mean", "sum")


def check_integer(name: str, value: object, *, least: int | None = None, most: int | None = None,
                  note: str = "") -> int:
    """``value`` as an int (numpy's and torch's integers too) in ``[least, most]``, or an error naming
    ``name``: a TypeError where it is no integer, a ValueError out of bounds. A bool (a torch bool
    tensor too, which indexes as 0 or 1) or a float is no integer: it would count as the number it
    stands for. ``note`` says what the value means, or what else is taken (" or None (automatic)")."""
    if least is not None and most is not None:
        bounds = f" in [{least}, {most}]"
    else:
        bounds = f" >= {least}" if least is not None else f" <= {most}" if most is not None else ""
    expected = f"{name} must be an integer{bounds}{note}; got {value!r}"
    if isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        raise TypeError(expected)
    try:
        count = operator.index(value)
    except TypeError:
        raise TypeError(expected) from None
    if least is not None and count < least or most is not None and count > most:
        raise ValueError(expected)
    return count


def check_real(name: str, value: object, *, positive: bool = False, non_negative: bool = False) -> float:
    """``value`` as a finite float, or a TypeError / ValueError naming ``name`` and the expectation."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_grad_filter_eps(value: object) -> float | str:
    """``"auto"``, or a probability budget in ``[0, 1)``; otherwise a TypeError / ValueError naming
    grad_filter_eps. A budget of 1 would leave a token's whole ``E_p[Wq]`` term out of its gradient."""
    expected = f"{AUTO!r} or a probability budget in [0, 1)"
    if isinstance(value, str):
        if value != AUTO:
            raise ValueError(f"grad_filter_eps must be {expected}, got {value!r}")
        return value
    value = check_real("grad_filter_eps", value, non_negative=True)
    if value >= 1:
        raise ValueError(f"grad_filter_eps must be {expected}, got {value}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


@dataclass(frozen=True)
class LossConfig:
    """The Q-Adapter loss options, validated on construction. The defaults are the authors'."""

    alpha_tilde: float = field(default=1.0, metadata={"help": "temperature of the customized policy (> 0)"})
    alpha_0: float = field(default=0.01, metadata={"help": "weight of the frozen model's log-probs (>= 0)"})
    gamma: float = field(default=1.0, metadata={"help": "discount of the soft value in the rewards (>= 0)"})
    beta: float = field(default=0.1, metadata={"help": "weight of the chi2 reward regularizer (>= 0)"})
    value_at: str = field(default="current", metadata={"help": "soft value of the token itself or the next one",
                                                        "choices": VALUE_AT})
    reward_norm: str = field(default="padded", metadata={"help": "per-sequence reward: sum over the padded length, "
                                                          "the scored tokens, or 1", "choices": REWARD_NORM})
    ignore_index: int = field(default=-100, metadata={"help": "label of positions that are not scored"})
    logit_softcap: float | None = field(default=None, metadata={
        "help": "the model's final logit soft-capping (Gemma-2's final_logit_softcapping): both heads' logits "
                "become s * tanh(logits / s); None: none"})
    grad_filter_eps: float | str = field(default=0.0, metadata={
        "help": "gradient filtering (>= 0, or 'auto': the input dtype's unit roundoff): the probability each "
                "token may leave out of the backward's p @ Wq, its lightest vocabulary blocks; an approximation "
                "of the gradient (the loss is exact); 0: the exact gradient. The chunked backends implement "
                "it; the reference takes 0 only (docs/design.md)"})

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "alpha_tilde", check_real("alpha_tilde", self.alpha_tilde, positive=True))
        set_(self, "alpha_0", check_real("alpha_0", self.alpha_0, non_negative=True))
        set_(self, "gamma", check_real("gamma", self.gamma, non_negative=True))
        set_(self, "beta", check_real("beta", self.beta, non_negative=True))
        set_(self, "grad_filter_eps", check_grad_filter_eps(self.grad_filter_eps))
        check_choice("value_at", self.value_at, VALUE_AT)
        check_choice("reward_norm", self.reward_norm, REWARD_NORM)
        if self.logit_softcap is not None:
            set_(self, "logit_softcap", check_real("logit_softcap", self.logit_softcap, positive=True))
        set_(self, "ignore_index", check_integer("ignore_index", self.ignore_index))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, config: LossConfig | None = None, **options) -> LossConfig:
        """``config`` (default: the defaults) with ``options`` replaced; an unknown name is a TypeError."""
        unknown = sorted(set(options) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown loss option(s) {', '.join(unknown)}; the options are {', '.join(cls.names())}")
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
        return dataclasses.replace(config or cls(), **options)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
