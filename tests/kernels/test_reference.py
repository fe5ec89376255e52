"""The reference backend is the spec: check it against float64 autograd and a plain transcription."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_inputs

from qadapter_kernels import LossConfig, qadapter_loss
from qadapter_kernels.reference import qadapter_loss_reference

OPTIONS = [
    dict(value_at=v, reward_norm=r)
    for v in ("current", "next")
    for r in ("padded", "mean", "sum")
]


def plain_loss(base, hq, weight, labels, *, q_weight=None, q_bias=None, alpha_tilde=1.0, alpha_0=0.01,
               gamma=1.0, beta=0.1, value_at="current", reward_norm="padded", ignore_index=-100):
    """docs/design.md, "The loss", transcribed with Python loops and scalars, in float64."""
    batch, seq, _ = base.shape
    wq = weight if q_weight is None else q_weight
    vocab = weight.shape[0]

    def soft_value(i, t):
        z = [float(base[i, t] @ weight[v]) for v in range(vocab)]
        lse_z = math.log(sum(math.exp(x - max(z)) for x in z)) + max(z)
        inner = [(q_value(i, t, v) + alpha_0 * (z[v] - lse_z)) / alpha_tilde for v in range(vocab)]
        m = max(inner)
        return alpha_tilde * (m + math.log(sum(math.exp(x - m) for x in inner)))

    def q_value(i, t, v):
        return float(hq[i, t] @ wq[v]) + (float(q_bias[v]) if q_bias is not None else 0.0)

    def scored(i, t):
        return t <= seq - 2 and int(labels[i, t + 1]) != ignore_index

    seq_rewards, squares, n = [], 0.0, 0
    for i in range(batch):
        total, count = 0.0, 0
        for t in range(seq - 1):
            if not scored(i, t):
                continue
            if value_at == "current":
                v = soft_value(i, t)
            else:
                v = soft_value(i, t + 1) if scored(i, t + 1) else 0.0
            r = q_value(i, t, int(labels[i, t + 1])) - gamma * v
            total, count, squares, n = total + r, count + 1, squares + r * r, n + 1
        norm = {"padded": seq - 1, "mean": max(count, 1), "sum": 1}[reward_norm]
        seq_rewards.append(total / norm)
    half = batch // 2
    bt = sum(math.log1p(math.exp(seq_rewards[half + k] - seq_rewards[k])) for k in range(half)) / half
    return bt + beta * squares / n, seq_rewards


@pytest.mark.parametrize("whole_logits", [False, True], ids=["backend", "whole-logits"])
@pytest.mark.parametrize("options", OPTIONS)
def test_reference_matches_plain_transcription(options, whole_logits):
    """The reference backend, and ``qadapter_loss_reference`` (the ``[B, T, V]`` spec the baselines
    compile), are the plain transcription: rows whose last position is scored give
    ``value_at="next"`` no successor there."""
    x = make_inputs(batch=4, seq=6, hidden=5, vocab=11, dtype=torch.float64, q_head=True, q_bias=True, seed=3)
    assert (x["labels"][:, -1] != -100).any()  # a last position that is scored
    hyper = dict(alpha_tilde=0.7, alpha_0=0.3, gamma=0.9, beta=0.2, **options)
    if whole_logits:
        out = qadapter_loss_reference(x["base_hidden"], x["q_hidden"], x["weight"], x["labels"], x["q_weight"],
                                      x["q_bias"], LossConfig(**hyper))
    else:
        out = qadapter_loss(**x, backend="reference", **hyper)
    expected, rewards = plain_loss(
        x["base_hidden"], x["q_hidden"].detach(), x["weight"], x["labels"],
        q_weight=x["q_weight"].detach(), q_bias=x["q_bias"].detach(), **hyper,
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    got = torch.cat([out.chosen_rewards, out.rejected_rewards]).tolist()
    assert got == pytest.approx(rewards, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("options", OPTIONS)
def test_reference_gradcheck(options):
    x = make_inputs(batch=4, seq=5, hidden=4, vocab=7, dtype=torch.float64, q_head=True, q_bias=True, seed=5)

    def f(hq, qw, qb):
        return qadapter_loss(x["base_hidden"], hq, x["weight"], x["labels"], q_weight=qw, q_bias=qb,
                             alpha_tilde=0.5, alpha_0=0.2, backend="reference", **options).loss

    assert torch.autograd.gradcheck(f, (x["q_hidden"], x["q_weight"], x["q_bias"]))


def test_metrics_follow_rewards():
    x = make_inputs(dtype=torch.float64, seed=11)
    out = qadapter_loss(**x, backend="reference")
    margin = out.chosen_rewards - out.rejected_rewards
    assert out.margin.item() == pytest.approx(margin.mean().item())
    assert out.accuracy.item() == pytest.approx((margin > 0).double().mean().item())
    assert out.loss.item() == pytest.approx(out.bt_loss.item() + out.chi2_loss.item())
    assert out.chosen_rewards[1].item() == 0.0  # the prompt-only row has reward 0
    assert not out.chosen_rewards.requires_grad and not out.bt_loss.requires_grad


def test_accuracy_is_strict():
    """A pair whose two rows score nothing has ``R_k = R_{k+K} = 0`` exactly: it is not counted as won."""
    x = make_inputs(dtype=torch.float64, seed=17)
    x["labels"][3] = -100  # the rejected row of the pair whose chosen row (1) scores nothing
    out = qadapter_loss(**x, backend="reference")
    assert out.chosen_rewards[1].item() == 0.0 and out.rejected_rewards[1].item() == 0.0
    won = float(out.chosen_rewards[0] > out.rejected_rewards[0])
    assert out.accuracy.item() == won / 2
