"""The gradient-free vocabulary pass against whole-row torch formulas, soft cap included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qadapter_kernels import LossConfig, qadapter_token_stats
from qadapter_kernels.vocabulary import MEASURES, token_logprobs, vocabulary_pass

IGNORE = -100


def whole_rows(hb, hq, w, targets, *, qw=None, qb=None, alpha_tilde, alpha_0, cap):
    """Every measure from the whole ``[N, V]`` logits in float64."""
    hb, hq, w = hb.double(), hq.double(), w.double()
    qw = w if qw is None else qw.double()
    z, q = hb @ w.T, hq @ qw.T + (0 if qb is None else qb.double())
    if cap is not None:
        z, q = cap * torch.tanh(z / cap), cap * torch.tanh(q / cap)
    log_pi1 = torch.log_softmax(z, -1)
    scores = (q + alpha_0 * log_pi1) / alpha_tilde
    log_pi = torch.log_softmax(scores, -1)
    scored = targets != IGNORE
    a = targets.clamp(min=0).unsqueeze(-1)

    def at(x):
        return torch.where(scored, x.gather(-1, a).squeeze(-1), 0.0)

    return {
        "q_taken": at(q), "value": alpha_tilde * scores.logsumexp(-1),
        "step0_q_taken": at(z), "step0_value": alpha_tilde * ((z + alpha_0 * log_pi1) / alpha_tilde).logsumexp(-1),
        "combined": at(log_pi), "base": at(log_pi1),
        "kl": (log_pi.exp() * (log_pi - log_pi1)).sum(-1), "greedy": log_pi.argmax(-1),
        "log_pi": log_pi,
    }


def inputs(dtype, seed=0, *, vocab=37, hidden=16, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hb = torch.randn(3, 7, hidden, generator=g) * scale
    hq = hb + torch.randn(3, 7, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden**0.5
    targets = torch.randint(0, vocab, (3, 7), generator=g)
    targets[0, :2] = IGNORE
    return hb.to(dtype), hq.to(dtype), w.to(dtype), targets


TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cap", [None, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_every_measure_is_the_whole_row_formula(dtype, cap, chunk_size):
    hb, hq, w, targets = inputs(dtype)
    got = vocabulary_pass(hb, hq, w, targets, measures=MEASURES, alpha_tilde=0.8, alpha_0=0.3, logit_softcap=cap,
                          chunk_size=chunk_size, top_k=4)
    want = whole_rows(hb, hq, w, targets, alpha_tilde=0.8, alpha_0=0.3, cap=cap)
    for name, value in want.items():
        if name == "greedy":  # a saturated cap makes near-ties: the pick's log-prob is the largest
            picked = want["log_pi"].gather(-1, got.greedy.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(picked, want["log_pi"].amax(-1), **TOL[dtype], msg=name)
            continue
        if name == "log_pi":
            continue
        torch.testing.assert_close(getattr(got, name).double(), value, **TOL[dtype], msg=name)
    # The top 4, largest first, and each id's own log-prob (near-ties may order ids differently).
    torch.testing.assert_close(got.top_logprobs.double(), want["log_pi"].topk(4, dim=-1).values, **TOL[dtype])
    torch.testing.assert_close(want["log_pi"].gather(-1, got.top_ids), got.top_logprobs.double(), **TOL[dtype])
    assert got.top_ids.shape == (3, 7, 4) and got.top_ids.dtype == torch.int64


def test_a_separate_q_head_and_only_what_is_asked():
    hb, hq, w, targets = inputs(torch.float32, seed=1)
    g = torch.Generator().manual_seed(2)
    qw, qb = w + 0.1 * torch.randn(w.shape, generator=g), torch.randn(w.shape[0], generator=g)
    got = vocabulary_pass(hb, hq, w, targets, q_weight=qw, q_bias=qb, measures=("stats", "kl"), alpha_tilde=1.2,
                          alpha_0=0.05, logit_softcap=2.0)
    want = whole_rows(hb, hq, w, targets, qw=qw, qb=qb, alpha_tilde=1.2, alpha_0=0.05, cap=2.0)
    for name in ("q_taken", "value", "kl"):
        torch.testing.assert_close(getattr(got, name).double(), want[name], rtol=1e-5, atol=1e-5)
    assert got.combined is None and got.step0_value is None and got.greedy is None and got.top_ids is None


def test_top_zero_and_the_whole_vocabulary():
    hb, hq, w, targets = inputs(torch.float32, seed=6)
    none = vocabulary_pass(hb, hq, w, measures=("top",), top_k=0)
    assert none.top_ids.shape == (3, 7, 0) and none.top_logprobs.shape == (3, 7, 0)
    every = vocabulary_pass(hb, hq, w, measures=("top",), top_k=w.shape[0])
    torch.testing.assert_close(every.top_logprobs.exp().sum(-1), torch.ones(3, 7))  # the whole distribution


def test_numpy_integers_are_counts():
    hb, hq, w, targets = inputs(torch.float32, seed=6)
    want = vocabulary_pass(hb, hq, w, targets, measures=("top", "stats"), top_k=4, chunk_size=5)
    got = vocabulary_pass(hb, hq, w, targets, measures=("top", "stats"), top_k=np.int64(4), chunk_size=np.int32(5),
                          ignore_index=np.int64(IGNORE))
    for name in ("top_ids", "top_logprobs", "q_taken", "value"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_the_statistics_are_the_training_losses():
    """Token stats for the scored tokens equal the backend's, soft cap included."""
    hb, hq, w, targets = inputs(torch.float32, seed=3)
    config = LossConfig(alpha_tilde=0.9, alpha_0=0.2, logit_softcap=0.5)
    labels = torch.cat([torch.full((3, 1), IGNORE), targets], dim=1)  # the loss shifts its labels by one
    pad = torch.zeros(3, 1, hb.shape[-1])
    stats = qadapter_token_stats(torch.cat([hb, pad], 1), torch.cat([hq, pad], 1), w, labels, config=config,
                                 backend="chunked")
    got = vocabulary_pass(hb, hq, w, targets, config=config)
    scored = targets != IGNORE
    torch.testing.assert_close(got.q_taken[scored], stats.q_taken.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.value[scored], stats.value.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cap", [None, 0.5])
def test_token_logprobs_of_one_model(cap):
    hb, _, w, targets = inputs(torch.float32, seed=4)
    got = token_logprobs(hb, w, targets, logit_softcap=cap, chunk_size=4)
    want = whole_rows(hb, hb, w, targets, alpha_tilde=1.0, alpha_0=0.0, cap=cap)["base"]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_cap_changes_the_numbers():
    """A cap that bites gives other numbers: a pass that ignored it would fail the tests above."""
    hb, hq, w, targets = inputs(torch.float32, seed=5)
    capped = vocabulary_pass(hb, hq, w, targets, measures=("logprobs",), logit_softcap=0.5)
    plain = vocabulary_pass(hb, hq, w, targets, measures=("logprobs",))
    assert (capped.base - plain.base).abs().max() > 0.1


@pytest.mark.parametrize("call, match", [
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq, w, None, measures=("stats",)), "targets are needed"),
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq, w, t, measures=("entropy",)), "measures must be one of"),
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq[:, :3], w, t), "base_hidden must have q_hidden's shape"),
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq, w, t[:, :3]), "targets must be"),
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq, w, t, chunk_size=0), "chunk_size must be an integer >= 1"),
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq, w, t + 1000), r"targets must lie in \[0, 37\)"),
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq, w, t, logit_softcap=-1.0), "logit_softcap must be > 0"),
    (lambda hb, hq, w, t: token_logprobs(hb, w[:, :3], t), "weight must be"),
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq, w, measures=("top",)), r"top_k must be an integer in \[0, 37\]"),
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq, w, measures=("top",), top_k=38), "top_k must be an integer"),
    (lambda hb, hq, w, t: vocabulary_pass(hb, hq, w, measures=("top",), top_k=True), "top_k must be an integer"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(*inputs(torch.float32))
