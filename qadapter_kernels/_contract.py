"""The loss contract shared by every backend: options, input checks, output, pairwise BT step.

A backend only has to produce per-token quantities; the pairing of chosen and rejected rows,
the reward normalization and the BT / chi2 terms live here once, on small ``[B, T]`` tensors,
so that autograd carries their gradient back to the per-token values cheaply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

VALUE_AT = ("current", "next")
REWARD_NORM = ("padded", "mean", "sum")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class QAdapterLossOutput(NamedTuple):
    """Result of :func:`qadapter_loss`. Only ``loss`` carries a gradient."""

    loss: torch.Tensor
    bt_loss: torch.Tensor
    chi2_loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


def _check_real(name: str, value: float, *, positive: bool = False, non_negative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if non_negative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


@dataclass(frozen=True)
class LossConfig:
    """Validated hyper-parameters of the loss (DESIGN section 2 defaults)."""

    alpha_tilde: float = 1.0
    alpha_0: float = 0.01
    gamma: float = 1.0
    beta: float = 0.1
    value_at: str = "current"
    reward_norm: str = "padded"
    ignore_index: int = -100

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "alpha_tilde", _check_real("alpha_tilde", self.alpha_tilde, positive=True))
        set_(self, "alpha_0", _check_real("alpha_0", self.alpha_0))
        set_(self, "gamma", _check_real("gamma", self.gamma))
        set_(self, "beta", _check_real("beta", self.beta, non_negative=True))
        check_choice("value_at", self.value_at, VALUE_AT)
        check_choice("reward_norm", self.reward_norm, REWARD_NORM)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_float_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    return t


def check_head(
    weight: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    *,
    hidden_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """Checks the frozen head and the optional Q head against the hidden states."""
    _check_float_tensor("weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ValueError(f"weight must be [V, d] with d={hidden_size} (the hidden size); got {_describe(weight)}")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    vocab = weight.shape[0]
    named = [("weight", weight)]
    if q_weight is not None:
        _check_float_tensor("q_weight", q_weight)
        if tuple(q_weight.shape) != (vocab, hidden_size):
            raise ValueError(f"q_weight must be [V, d] = [{vocab}, {hidden_size}] like weight; got {_describe(q_weight)}")
        named.append(("q_weight", q_weight))
    if q_bias is not None:
        _check_float_tensor("q_bias", q_bias)
        if tuple(q_bias.shape) != (vocab,):
            raise ValueError(f"q_bias must be [V] = [{vocab}]; got {_describe(q_bias)}")
        named.append(("q_bias", q_bias))
    for name, t in named:
        if t.dtype != dtype:
            raise TypeError(f"{name} must have the hidden states' dtype {dtype}; got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on the hidden states' device {device}; got {t.device}")


def check_loss_inputs(
    base_hidden: torch.Tensor,
    q_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    q_weight: torch.Tensor | None,
    q_bias: torch.Tensor | None,
    config: LossConfig,
) -> None:
    """Raises a clear error, naming the argument, for every malformed input."""
    _check_float_tensor("base_hidden", base_hidden)
    _check_float_tensor("q_hidden", q_hidden)
    if q_hidden.dim() != 3:
        raise ValueError(f"q_hidden must be [B, T, d]; got {_describe(q_hidden)}")
    if base_hidden.shape != q_hidden.shape:
        raise ValueError(
            f"base_hidden must have q_hidden's shape {tuple(q_hidden.shape)}; got {tuple(base_hidden.shape)}"
        )
    batch, seq, hidden = q_hidden.shape
    if batch == 0 or batch % 2:
        raise ValueError(
            f"the batch size B (dim 0 of q_hidden) must be even and > 0: rows 0..B/2-1 are the chosen "
            f"responses, rows B/2.. the rejected ones; got B={batch}"
        )
    if seq < 2:
        raise ValueError(f"the sequence length T (dim 1 of q_hidden) must be >= 2; got T={seq}")
    if base_hidden.dtype != q_hidden.dtype:
        raise TypeError(f"base_hidden must have q_hidden's dtype {q_hidden.dtype}; got {base_hidden.dtype}")
    if base_hidden.device != q_hidden.device:
        raise ValueError(f"base_hidden must be on q_hidden's device {q_hidden.device}; got {base_hidden.device}")
    check_head(weight, q_weight, q_bias, hidden_size=hidden, dtype=q_hidden.dtype, device=q_hidden.device)

    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (token ids); got {labels.dtype}")
    if tuple(labels.shape) != (batch, seq):
        raise ValueError(f"labels must be [B, T] = [{batch}, {seq}]; got shape {tuple(labels.shape)}")
    if labels.device != q_hidden.device:
        raise ValueError(f"labels must be on q_hidden's device {q_hidden.device}; got {labels.device}")
    actions = labels[:, 1:]
    scored = actions != config.ignore_index
    vocab = weight.shape[0]
    bad = scored & ((actions < 0) | (actions >= vocab))
    if bool(bad.any()):
        value = int(actions[bad][0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) (the vocabulary size V) or equal ignore_index="
            f"{config.ignore_index}; found {value}"
        )
    if not bool(scored.any()):
        raise ValueError(
            "labels score no token at all: every labels[:, 1:] equals ignore_index, so the loss is undefined"
        )


def scatter_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Packed per-token ``values`` back into ``[B, T-1]``, zeros where unscored (differentiable)."""
    return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)


def token_rewards(
    q_taken: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, config: LossConfig
) -> torch.Tensor:
    """Per-token rewards ``[B, T-1]`` from packed ``Q[t, a_t]`` and ``V_t`` of the scored tokens."""
    if config.value_at == "current":
        return scatter_rows(q_taken - config.gamma * value, mask)
    value_rows = scatter_rows(value, mask)  # zero where t is not scored
    next_value = F.pad(value_rows[:, 1:], (0, 1))
    return scatter_rows(q_taken - config.gamma * next_value[mask], mask)


def pairwise_loss(rewards: torch.Tensor, mask: torch.Tensor, config: LossConfig) -> QAdapterLossOutput:
    """BT + chi2 from per-token rewards ``[B, T-1]`` (zero where unscored) and the scored mask."""
    counts = mask.sum(dim=1)
    sums = rewards.sum(dim=1)
    if config.reward_norm == "padded":
        seq_rewards = sums / mask.shape[1]
    elif config.reward_norm == "mean":
        seq_rewards = sums / counts.clamp(min=1).to(sums.dtype)
    else:
        seq_rewards = sums
    half = rewards.shape[0] // 2
    chosen, rejected = seq_rewards[:half], seq_rewards[half:]
    bt = F.softplus(rejected - chosen).mean()
    chi2 = config.beta * rewards.square().sum() / counts.sum().to(rewards.dtype)
    chosen_d, rejected_d = chosen.detach(), rejected.detach()
    return QAdapterLossOutput(
        loss=bt + chi2,
        bt_loss=bt.detach(),
        chi2_loss=chi2.detach(),
        chosen_rewards=chosen_d,
        rejected_rewards=rejected_d,
        accuracy=(chosen_d > rejected_d).to(chosen_d.dtype).mean(),
        margin=(chosen_d - rejected_d).mean(),
    )
