"""The bad-input table of the loss op and its building blocks: every case names the error type and a
fragment of its message (errors name the argument and what was expected), or the valid result.

A "meta" tensor stands in for one on another device: the checks look at ``.device`` only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import make_inputs

from qadapter_kernels import (
    LossConfig,
    combine_logits,
    combined_logprobs,
    combined_logprobs_at,
    qadapter_loss,
    qadapter_token_stats,
)
from qadapter_kernels.vocabulary import token_logprobs, vocabulary_pass

B, T, D, V = 2, 4, 8, 11
TENSORS = ("base_hidden", "q_hidden", "weight", "q_weight", "q_bias")


def inputs(batch=B, seq=T, **kw) -> dict:
    x = make_inputs(batch=batch, seq=seq, hidden=D, vocab=V, q_head=True, q_bias=True, prompt_only_row=False, **kw)
    x = {k: v.detach() for k, v in x.items()}
    x["labels"][:, 1] = 3  # every row scores at least one token
    return x


def with_(name, value, **kw):
    x = inputs(**kw)
    x[name] = value(x) if callable(value) else value
    return x


def loss(x, **kw):
    kw.setdefault("backend", "reference")
    return qadapter_loss(**x, **kw)


def stats(x, **kw):
    kw.setdefault("backend", "reference")
    return qadapter_token_stats(**x, **kw)


def hidden_only(x):
    return {k: x[k] for k in ("base_hidden", "q_hidden", "weight", "q_weight", "q_bias")}


def logprobs(x, **kw):
    return combined_logprobs(**hidden_only(x), **kw)


def logprobs_at(x, targets=None, **kw):
    kw.setdefault("backend", "reference")
    t = x["labels"][:, 1:] if targets is None else targets
    h = hidden_only(x)
    h["base_hidden"], h["q_hidden"] = h["base_hidden"][:, :-1], h["q_hidden"][:, :-1]
    return combined_logprobs_at(targets=t, **h, **kw)


def vpass(x, targets="labels", **kw):
    t = x["labels"] if targets == "labels" else targets
    return vocabulary_pass(targets=t, **hidden_only(x), **kw)


def tlogprobs(x, targets="labels", **kw):
    t = x["labels"] if targets == "labels" else targets
    return token_logprobs(x["base_hidden"], x["weight"], t, **kw)


def logits(shape=(3, V), dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


def finite(out) -> bool:
    return bool(torch.isfinite(out.loss))


CASES: list = []


def case(surface: str, name: str, call, expected, fragment=None):
    """``expected``: an exception type (with a message ``fragment``) or a predicate on the result."""
    CASES.append(pytest.param(call, expected, fragment, id=f"{surface}:{name}"))


# ---------------------------------------------------------------- qadapter_loss: tensors, dtypes, devices
for t in TENSORS:
    case("loss", f"{t}-list", lambda t=t: loss(with_(t, lambda x, t=t: x[t].tolist())), TypeError,
         f"{t} must be a torch.Tensor")
    case("loss", f"{t}-int64", lambda t=t: loss(with_(t, lambda x, t=t: x[t].long())), TypeError,
         f"{t} must be float16, bfloat16, float32 or float64")
    case("loss", f"{t}-complex", lambda t=t: loss(with_(t, lambda x, t=t: x[t].to(torch.complex64))), TypeError,
         f"{t} must be float16")
    case("loss", f"{t}-bool", lambda t=t: loss(with_(t, lambda x, t=t: x[t] > 0)), TypeError, f"{t} must be float16")
    case("loss", f"{t}-meta", lambda t=t: loss(with_(t, lambda x, t=t: x[t].to("meta"))),
         (ValueError, TypeError), "device")
for t in ("base_hidden", "weight", "q_weight", "q_bias"):
    case("loss", f"{t}-float64-among-float32", lambda t=t: loss(with_(t, lambda x, t=t: x[t].double())), TypeError,
         "dtype")
    case("loss", f"{t}-float16-among-float32", lambda t=t: loss(with_(t, lambda x, t=t: x[t].half())), TypeError,
         "dtype")
case("loss", "labels-list", lambda: loss(with_("labels", lambda x: x["labels"].tolist())), TypeError,
     "labels must be a torch.Tensor")
case("loss", "labels-meta", lambda: loss(with_("labels", lambda x: x["labels"].to("meta"))), ValueError,
     "labels must be on the hidden states' device")
case("loss", "all-meta", lambda: loss({k: v.to("meta") for k, v in inputs().items()}), Exception, "")
for dt in (torch.float16, torch.float64):
    case("loss", f"all-{dt}", lambda dt=dt: loss({k: (v.to(dt) if v.is_floating_point() else v)
                                                  for k, v in inputs().items()}), finite)

# ---------------------------------------------------------------- qadapter_loss: shapes
case("loss", "q_hidden-2d", lambda: loss(with_("q_hidden", lambda x: x["q_hidden"][0])), ValueError,
     "q_hidden must be [B, T, d]")
case("loss", "q_hidden-4d", lambda: loss(with_("q_hidden", lambda x: x["q_hidden"][None])), ValueError,
     "q_hidden must be [B, T, d]")
case("loss", "base_hidden-shorter", lambda: loss(with_("base_hidden", lambda x: x["base_hidden"][:, :-1])),
     ValueError, "base_hidden must have q_hidden's shape")
case("loss", "base_hidden-wider", lambda: loss(with_("base_hidden", lambda x: torch.cat([x["base_hidden"]] * 2, -1))),
     ValueError, "base_hidden must have q_hidden's shape")
for batch in (1, 3, 5):
    case("loss", f"odd-batch-{batch}", lambda batch=batch: loss(inputs(batch=batch)), ValueError, "must be even")
case("loss", "empty-batch",
     lambda: loss({k: v[:0] for k, v in inputs().items() if k not in ("weight", "q_weight", "q_bias")}
                  | {k: inputs()[k] for k in ("weight", "q_weight", "q_bias")}), ValueError, "even and > 0")
case("loss", "seq-1", lambda: loss({k: (v[:, :1] if v.dim() >= 2 and k not in ("weight", "q_weight") else v)
                                    for k, v in inputs().items()}), ValueError, "must be >= 2")
case("loss", "seq-0", lambda: loss({k: (v[:, :0] if v.dim() >= 2 and k not in ("weight", "q_weight") else v)
                                    for k, v in inputs().items()}), ValueError, "must be >= 2")
case("loss", "weight-1d", lambda: loss(with_("weight", lambda x: x["weight"][0])), ValueError, "weight must be [V, d]")
case("loss", "weight-wrong-d", lambda: loss(with_("weight", lambda x: x["weight"][:, :-1])), ValueError,
     "weight must be [V, d] with d=8")
case("loss", "weight-transposed", lambda: loss(with_("weight", lambda x: x["weight"].T.contiguous())), ValueError,
     "weight must be [V, d]")
case("loss", "weight-no-rows", lambda: loss(with_("weight", lambda x: x["weight"][:0])), ValueError,
     "at least one vocabulary row")
case("loss", "q_weight-fewer-rows", lambda: loss(with_("q_weight", lambda x: x["q_weight"][:-1])), ValueError,
     "q_weight must be [V, d] = [11, 8]")
case("loss", "q_weight-wrong-d", lambda: loss(with_("q_weight", lambda x: x["q_weight"][:, :-1])), ValueError,
     "q_weight must be [V, d]")
case("loss", "q_bias-short", lambda: loss(with_("q_bias", lambda x: x["q_bias"][:-1])), ValueError,
     "q_bias must be [V] = [11]")
case("loss", "q_bias-2d", lambda: loss(with_("q_bias", lambda x: x["q_bias"][None])), ValueError, "q_bias must be [V]")
case("loss", "q_bias-scalar", lambda: loss(with_("q_bias", lambda x: x["q_bias"][0])), ValueError, "q_bias must be [V]")
case("loss", "no-q-head", lambda: loss(with_("q_weight", None) | {"q_bias": None}), finite)
case("loss", "bias-without-q_weight", lambda: loss(with_("q_weight", None)), finite)
case("loss", "noncontiguous-hidden", lambda: loss(with_("q_hidden", lambda x: x["q_hidden"].transpose(0, 1)
                                                        .contiguous().transpose(0, 1))), finite)

# ---------------------------------------------------------------- qadapter_loss: labels
case("loss", "labels-float", lambda: loss(with_("labels", lambda x: x["labels"].float())), TypeError,
     "labels must be an integer tensor")
case("loss", "labels-bool", lambda: loss(with_("labels", lambda x: x["labels"] > 0)), TypeError,
     "labels must be an integer tensor")
case("loss", "labels-1d", lambda: loss(with_("labels", lambda x: x["labels"][0])), ValueError, "labels must be [B, T]")
case("loss", "labels-short", lambda: loss(with_("labels", lambda x: x["labels"][:, :-1])), ValueError,
     "labels must be [B, T] = [2, 4]")
case("loss", "labels-eq-V", lambda: loss(with_("labels", lambda x: x["labels"].index_fill(1, torch.tensor([2]), V))),
     ValueError, "must lie in [0, 11)")
case("loss", "labels-negative", lambda: loss(with_("labels", lambda x: x["labels"].index_fill(1, torch.tensor([2]), -1))),
     ValueError, "found -1")
case("loss", "labels-huge", lambda: loss(with_("labels", lambda x: x["labels"].index_fill(1, torch.tensor([3]), 2**40))),
     ValueError, "found 1099511627776")
case("loss", "labels-all-ignored", lambda: loss(with_("labels", lambda x: torch.full_like(x["labels"], -100))),
     ValueError, "score no token")
case("loss", "labels-only-first-column",
     lambda: loss(with_("labels", lambda x: torch.full_like(x["labels"], -100).index_fill(1, torch.tensor([0]), 1))),
     ValueError, "score no token")
case("loss", "labels-first-column-out-of-range",
     lambda: loss(with_("labels", lambda x: x["labels"].index_fill(1, torch.tensor([0]), 999))), finite)
case("loss", "labels-int32", lambda: loss(with_("labels", lambda x: x["labels"].int())), finite)
case("loss", "labels-uint8", lambda: loss(with_("labels", lambda x: x["labels"].clamp(min=0).to(torch.uint8)),
                                          ignore_index=0), finite)
case("loss", "ignore_index--1", lambda: loss(with_("labels", lambda x: x["labels"].masked_fill(x["labels"] < 0, -1)),
                                             ignore_index=-1), finite)
case("loss", "ignore_index-mismatch", lambda: loss(with_("labels", lambda x: x["labels"].index_fill(1, torch.tensor([3]), -100)),
                                                   ignore_index=-1), ValueError, "found -100")
case("loss", "one-scored-token",
     lambda: loss(with_("labels", lambda x: torch.full_like(x["labels"], -100).index_fill(1, torch.tensor([1]), 3)),
                  reward_norm="mean"), finite)
case("loss", "single-pair-T2", lambda: loss({k: (v[:, :2] if k in ("base_hidden", "q_hidden", "labels") else v)
                                              for k, v in inputs().items()}), finite)

# ---------------------------------------------------------------- qadapter_loss: options, backends, chunk sizes, totals
BAD_REALS = [("zero", 0.0), ("negative", -1.0), ("nan", math.nan), ("inf", math.inf), ("bool", True), ("str", "1"),
             ("none", None), ("complex", 1j)]
for opt in ("alpha_tilde", "alpha_0", "gamma", "beta", "logit_softcap", "grad_filter_eps"):
    for name, value in BAD_REALS:
        if name == "zero" and opt in ("alpha_0", "gamma", "beta", "grad_filter_eps"):
            continue  # 0 is allowed there
        if name == "none" and opt == "logit_softcap":
            continue  # None: no cap
        exc = TypeError if name in ("bool", "str", "none", "complex") else ValueError
        if opt == "grad_filter_eps" and name == "str":
            exc = ValueError  # a string, but not "auto"
        case("loss", f"{opt}-{name}", lambda opt=opt, value=value: loss(inputs(), **{opt: value}), exc, opt)
for opt, value in (("alpha_0", 0.0), ("gamma", 0.0), ("beta", 0.0), ("logit_softcap", 30.0), ("alpha_tilde", 2)):
    case("loss", f"{opt}-{value}-valid", lambda opt=opt, value=value: loss(inputs(), **{opt: value}), finite)
case("loss", "value_at-typo", lambda: loss(inputs(), value_at="nxt"), ValueError, "value_at")
case("loss", "value_at-none", lambda: loss(inputs(), value_at=None), ValueError, "value_at")
case("loss", "reward_norm-typo", lambda: loss(inputs(), reward_norm="avg"), ValueError, "reward_norm")
case("loss", "ignore_index-float", lambda: loss(inputs(), ignore_index=-100.0), TypeError, "ignore_index must be an int")
case("loss", "ignore_index-bool", lambda: loss(inputs(), ignore_index=True), TypeError, "ignore_index must be an int")
case("loss", "unknown-option", lambda: loss(inputs(), alpha=1.0), TypeError, "unknown loss option(s) alpha")
case("loss", "config-dict", lambda: loss(inputs(), config={"beta": 0.1}), TypeError, "config must be a LossConfig")
case("loss", "config-and-option", lambda: loss(inputs(), config=LossConfig(beta=0.5), gamma=0.5), finite)
case("loss", "grad_filter_eps-on-reference", lambda: loss(inputs(), grad_filter_eps=1e-3), ValueError,
     "grad_filter_eps=0.001")
case("loss", "grad_filter_eps-auto-on-reference", lambda: loss(inputs(), grad_filter_eps="auto"), ValueError,
     "grad_filter_eps='auto'")
case("loss", "grad_filter_eps-typo", lambda: loss(inputs(), grad_filter_eps="Auto"), ValueError,
     "grad_filter_eps must be 'auto' or a probability budget in [0, 1)")
case("loss", "grad_filter_eps-on-chunked-valid", lambda: loss(inputs(), backend="chunked", grad_filter_eps=1e-3),
     finite)
case("loss", "grad_filter_eps-auto-on-chunked-valid",
     lambda: loss(inputs(), backend="chunked", grad_filter_eps="auto"), finite)
case("loss", "backend-typo", lambda: loss(inputs(), backend="fast"), ValueError, "backend")
case("loss", "backend-none", lambda: loss(inputs(), backend=None), ValueError, "backend")
case("loss", "backend-cuda-on-cpu", lambda: loss(inputs(), backend="cuda"), RuntimeError, "not available")
CHUNK_SIZE = "chunk_size must be an integer >= 1 or None (automatic)"
for name, value, error in (("zero", 0, ValueError), ("negative", -2, ValueError), ("float", 2.0, TypeError),
                           ("bool", True, TypeError), ("str", "4", TypeError)):
    case("loss", f"chunk_size-{name}", lambda value=value: loss(inputs(), backend="chunked", chunk_size=value),
         error, CHUNK_SIZE)
for value in (1, 3, 10**9, None, np.int64(3), torch.tensor(3)):
    case("loss", f"chunk_size-{value!r}-valid", lambda value=value: loss(inputs(), backend="chunked", chunk_size=value),
         finite)
for name, value in (("numpy-bool", np.bool_(True)), ("torch-bool", torch.tensor(True))):
    case("loss", f"chunk_size-{name}", lambda value=value: loss(inputs(), backend="chunked", chunk_size=value),
         TypeError, CHUNK_SIZE)
case("LossConfig", "ignore_index-torch-bool", lambda: LossConfig(ignore_index=torch.tensor(False)), TypeError,
     "ignore_index must be an int")
case("loss", "numpy-integers-valid",
     lambda: loss(inputs(), total_pairs=np.int64(4), total_tokens=np.int32(99), reward_norm="sum",
                  ignore_index=np.int64(-100)), finite)
case("loss", "total_pairs-alone", lambda: loss(inputs(), total_pairs=2, reward_norm="sum"), ValueError,
     "total_pairs and total_tokens go together")
case("loss", "totals-padded", lambda: loss(inputs(), total_pairs=2, total_tokens=99), ValueError, 'reward_norm="mean"')
case("loss", "total_pairs-zero", lambda: loss(inputs(), total_pairs=0, total_tokens=99, reward_norm="sum"),
     ValueError, "total_pairs must be an integer >= 1 (this batch's own count); got 0")
case("loss", "total_pairs-float", lambda: loss(inputs(), total_pairs=2.0, total_tokens=99, reward_norm="sum"),
     TypeError, "total_pairs must be an integer")
case("loss", "total_tokens-bool", lambda: loss(inputs(), total_pairs=2, total_tokens=True, reward_norm="sum"),
     TypeError, "total_tokens must be an integer")
case("loss", "total_tokens-below-own", lambda: loss(inputs(), total_pairs=2, total_tokens=1, reward_norm="sum"),
     ValueError, "(this batch's own count); got 1")
case("loss", "total_tokens-float-tensor",
     lambda: loss(inputs(), total_pairs=2, total_tokens=torch.tensor(99.0), reward_norm="sum"), TypeError,
     "total_tokens must be an integer")
case("loss", "totals-int-tensors",
     lambda: loss(inputs(), total_pairs=torch.tensor(4), total_tokens=torch.tensor(99), reward_norm="sum"), finite)

# ---------------------------------------------------------------- qadapter_token_stats
case("stats", "odd-batch-valid", lambda: stats(inputs(batch=3)), lambda s: s.rows.max() == 2)
case("stats", "single-row-valid", lambda: stats(inputs(batch=1)), lambda s: s.q_taken.numel() >= 1)
case("stats", "empty-batch", lambda: stats({k: (v[:0] if k in ("base_hidden", "q_hidden", "labels") else v)
                                            for k, v in inputs().items()}), ValueError, "> 0")
case("stats", "labels-all-ignored", lambda: stats(with_("labels", lambda x: torch.full_like(x["labels"], -100))),
     ValueError, "score no token")
case("stats", "labels-out-of-range", lambda: stats(with_("labels", lambda x: x["labels"] + V)), ValueError,
     "must lie in [0, 11)")
case("stats", "q_hidden-int", lambda: stats(with_("q_hidden", lambda x: x["q_hidden"].int())), TypeError,
     "q_hidden must be float16")
case("stats", "weight-meta", lambda: stats(with_("weight", lambda x: x["weight"].to("meta"))), ValueError,
     "weight must be on the hidden states' device")
case("stats", "chunk_size-zero", lambda: stats(inputs(), backend="chunked", chunk_size=0), ValueError, "chunk_size")
case("stats", "unknown-option", lambda: stats(inputs(), temperature=1.0), TypeError, "unknown loss option")
case("stats", "backend-typo", lambda: stats(inputs(), backend="ref"), ValueError, "backend")
case("stats", "alpha_tilde-negative", lambda: stats(inputs(), alpha_tilde=-1.0), ValueError, "alpha_tilde")
case("stats", "labels-shape", lambda: stats(with_("labels", lambda x: x["labels"].T)), ValueError, "labels must be")

# ---------------------------------------------------------------- combined_logprobs
case("logprobs", "valid-shape", lambda: logprobs(inputs()), lambda out: out.shape == (B, T, V))
case("logprobs", "valid-normalised", lambda: logprobs(inputs()),
     lambda out: torch.allclose(out.logsumexp(-1), torch.zeros(B, T), atol=1e-5))
case("logprobs", "flat-tokens", lambda: combined_logprobs(torch.randn(5, D), torch.randn(5, D), torch.randn(V, D)),
     lambda out: out.shape == (5, V))
case("logprobs", "one-token-vector", lambda: combined_logprobs(torch.randn(D), torch.randn(D), torch.randn(V, D)),
     lambda out: out.shape == (V,))
case("logprobs", "no-tokens", lambda: combined_logprobs(torch.randn(0, D), torch.randn(0, D), torch.randn(V, D)),
     lambda out: out.shape == (0, V))
case("logprobs", "scalar-hidden", lambda: combined_logprobs(torch.tensor(1.0), torch.tensor(1.0), torch.randn(V, 1)),
     ValueError, "[..., d]")
case("logprobs", "shape-mismatch", lambda: logprobs(with_("base_hidden", lambda x: x["base_hidden"][:1])), ValueError,
     "base_hidden must have q_hidden's shape")
case("logprobs", "dtype-mismatch", lambda: logprobs(with_("base_hidden", lambda x: x["base_hidden"].double())),
     TypeError, "base_hidden must match q_hidden's dtype")
case("logprobs", "base-meta", lambda: logprobs(with_("base_hidden", lambda x: x["base_hidden"].to("meta"))),
     TypeError, "device")
case("logprobs", "weight-wrong-d", lambda: logprobs(with_("weight", lambda x: x["weight"][:, 1:])), ValueError,
     "weight must be [V, d] with d=8")
case("logprobs", "q_bias-short", lambda: logprobs(with_("q_bias", lambda x: x["q_bias"][1:])), ValueError, "q_bias")
case("logprobs", "q_weight-int", lambda: logprobs(with_("q_weight", lambda x: x["q_weight"].long())), TypeError,
     "q_weight must be float16")
case("logprobs", "alpha_tilde-zero", lambda: logprobs(inputs(), alpha_tilde=0.0), ValueError, "alpha_tilde")
case("logprobs", "alpha_0-negative", lambda: logprobs(inputs(), alpha_0=-0.5), ValueError, "alpha_0")
case("logprobs", "logit_softcap-negative", lambda: logprobs(inputs(), logit_softcap=-3.0), ValueError, "logit_softcap")
case("logprobs", "chunk_size-zero", lambda: logprobs(inputs(), chunk_size=0), ValueError, "chunk_size")
case("logprobs", "chunk_size-1-valid", lambda: logprobs(inputs(), chunk_size=1), lambda out: out.shape == (B, T, V))
case("logprobs", "chunk_size-numpy-valid", lambda: logprobs(inputs(), chunk_size=np.int64(1)),
     lambda out: out.shape == (B, T, V))
case("logprobs", "hidden-list", lambda: combined_logprobs([1.0] * D, torch.randn(D), torch.randn(V, D)), TypeError,
     "base_hidden must be a torch.Tensor")

# ---------------------------------------------------------------- combined_logprobs_at
case("logprobs_at", "valid", lambda: logprobs_at(inputs()), lambda out: out.combined.shape == (B, T - 1))
case("logprobs_at", "all-ignored-zeros",
     lambda: logprobs_at(inputs(), targets=torch.full((B, T - 1), -100)),
     lambda out: not out.combined.any() and not out.base.any())
case("logprobs_at", "targets-float", lambda: logprobs_at(inputs(), targets=torch.zeros(B, T - 1)), TypeError,
     "targets must be an integer tensor")
case("logprobs_at", "targets-shifted-shape", lambda: logprobs_at(inputs(), targets=torch.zeros(B, T, dtype=torch.long)),
     ValueError, "targets must be the hidden states' leading dimensions")
case("logprobs_at", "targets-out-of-range", lambda: logprobs_at(inputs(), targets=torch.full((B, T - 1), V)),
     ValueError, "targets must lie in [0, 11)")
case("logprobs_at", "targets-meta",
     lambda: logprobs_at(inputs(), targets=torch.zeros(B, T - 1, dtype=torch.long, device="meta")), ValueError,
     "targets must be on the hidden states' device")
case("logprobs_at", "targets-list", lambda: logprobs_at(inputs(), targets=[[0] * (T - 1)] * B), TypeError,
     "targets must be a torch.Tensor")
case("logprobs_at", "backend-typo", lambda: logprobs_at(inputs(), backend="gpu"), ValueError, "backend")
case("logprobs_at", "chunk_size-negative", lambda: logprobs_at(inputs(), chunk_size=-1), ValueError, "chunk_size")
case("logprobs_at", "ignore_index-str", lambda: logprobs_at(inputs(), ignore_index="-100"), TypeError, "ignore_index")
case("logprobs_at", "numpy-integers-valid", lambda: logprobs_at(inputs(), ignore_index=np.int64(-100), chunk_size=np.int64(2)),
     lambda out: out.combined.shape == (B, T - 1))
case("logprobs_at", "alpha_tilde-inf", lambda: logprobs_at(inputs(), alpha_tilde=math.inf), ValueError, "alpha_tilde")
case("logprobs_at", "q_bias-meta", lambda: logprobs_at(with_("q_bias", lambda x: x["q_bias"].to("meta"))),
     ValueError, "q_bias must be on the hidden states' device")

# ---------------------------------------------------------------- combine_logits
case("combine", "valid", lambda: combine_logits(logits(), logits()),
     lambda out: torch.allclose(out.exp().sum(-1), torch.ones(3)))
case("combine", "valid-float64-stays", lambda: combine_logits(logits(dtype=torch.float64), logits(dtype=torch.float64)),
     lambda out: out.dtype == torch.float64)
case("combine", "valid-1d", lambda: combine_logits(logits((V,)), logits((V,))), lambda out: out.shape == (V,))
case("combine", "shape-mismatch", lambda: combine_logits(logits((3, V)), logits((3, V + 1))), ValueError,
     "q_values must have base_logits' shape")
case("combine", "device-meta", lambda: combine_logits(logits(), logits(device="meta")), ValueError,
     "q_values must be on base_logits' device")
case("combine", "base-int", lambda: combine_logits(torch.zeros(3, V, dtype=torch.long), logits()), TypeError,
     "base_logits must be float16")
case("combine", "q-list", lambda: combine_logits(logits(), [[0.0] * V] * 3), TypeError, "q_values must be a torch.Tensor")
case("combine", "alpha_tilde-zero", lambda: combine_logits(logits(), logits(), alpha_tilde=0), ValueError, "alpha_tilde")
case("combine", "alpha_tilde-str", lambda: combine_logits(logits(), logits(), alpha_tilde="1"), TypeError, "alpha_tilde")
case("combine", "alpha_0-negative", lambda: combine_logits(logits(), logits(), alpha_0=-1), ValueError, "alpha_0")
case("combine", "alpha_0-nan", lambda: combine_logits(logits(), logits(), alpha_0=math.nan), ValueError, "alpha_0")
case("combine", "dtype-mismatch", lambda: combine_logits(logits(dtype=torch.float64), logits()), TypeError,
     "q_values must have base_logits' dtype")

# ---------------------------------------------------------------- vocabulary_pass / token_logprobs
case("vocabulary", "valid-stats", lambda: vpass(inputs()), lambda m: m.q_taken.shape == (B, T))
case("vocabulary", "measure-typo", lambda: vpass(inputs(), measures=("stat",)), ValueError, "measures")
case("vocabulary", "measures-str", lambda: vpass(inputs(), measures="stats"), ValueError, "measures")
case("vocabulary", "stats-without-targets", lambda: vpass(inputs(), targets=None), ValueError,
     "targets are needed for the measures ['stats']")
case("vocabulary", "targets-float", lambda: vpass(inputs(), targets=torch.zeros(B, T)), TypeError, "targets")
case("vocabulary", "targets-wrong-shape", lambda: vpass(inputs(), targets=torch.zeros(B, T + 1, dtype=torch.long)),
     ValueError, "targets must be")
case("vocabulary", "targets-out-of-range", lambda: vpass(inputs(), targets=torch.full((B, T), V)), ValueError,
     "[0, 11)")
case("vocabulary", "chunk_size-zero", lambda: vpass(inputs(), chunk_size=0), ValueError, "chunk_size")
case("vocabulary", "unknown-option", lambda: vpass(inputs(), alpha=2.0), TypeError, "unknown loss option")
case("vocabulary", "bad-option-value", lambda: vpass(inputs(), alpha_tilde=-1.0), ValueError, "alpha_tilde")
case("vocabulary", "weight-meta", lambda: vpass(with_("weight", lambda x: x["weight"].to("meta"))), ValueError,
     "weight must be on the hidden states' device")
case("vocabulary", "no-measures", lambda: vpass(inputs(), measures=()), ValueError, "measures must be a non-empty tuple")
case("token_logprobs", "valid", lambda: tlogprobs(inputs()), lambda out: bool((out <= 0).all()) and out.shape == (B, T))
case("token_logprobs", "bias-short", lambda: tlogprobs(inputs(), bias=torch.zeros(V - 1)), ValueError, "[V]")
case("token_logprobs", "bias-int", lambda: tlogprobs(inputs(), bias=torch.zeros(V, dtype=torch.long)), TypeError,
     "float16")
case("token_logprobs", "targets-float", lambda: tlogprobs(inputs(), targets=torch.zeros(B, T)), TypeError,
     "targets must be an integer tensor")
case("token_logprobs", "targets-out-of-range", lambda: tlogprobs(inputs(), targets=torch.full((B, T), -5)),
     ValueError, "found -5")
case("token_logprobs", "chunk_size-float", lambda: tlogprobs(inputs(), chunk_size=1.5), TypeError, "chunk_size")
case("token_logprobs", "logit_softcap-zero", lambda: tlogprobs(inputs(), logit_softcap=0.0), ValueError,
     "logit_softcap")
case("token_logprobs", "ignore_index-float", lambda: tlogprobs(inputs(), ignore_index=0.5), TypeError, "ignore_index")
case("token_logprobs", "numpy-integers-valid", lambda: tlogprobs(inputs(), ignore_index=np.int64(-100),
                                                                 chunk_size=np.int64(2)), lambda out: out.shape == (B, T))
case("token_logprobs", "weight-wrong-d", lambda: token_logprobs(torch.randn(3, D), torch.randn(V, D + 1),
                                                                torch.zeros(3, dtype=torch.long)), ValueError, "d=8")
case("token_logprobs", "hidden-meta", lambda: token_logprobs(torch.randn(3, D, device="meta"), torch.randn(V, D),
                                                             torch.zeros(3, dtype=torch.long)), ValueError, "device")

# ---------------------------------------------------------------- LossConfig
for opt in ("alpha_tilde", "alpha_0", "gamma", "beta", "logit_softcap", "grad_filter_eps"):
    for name, value in (("negative", -0.5), ("nan", math.nan), ("-inf", -math.inf), ("bool", False), ("list", [1.0])):
        exc = TypeError if name in ("bool", "list") else ValueError
        case("LossConfig", f"{opt}-{name}", lambda opt=opt, value=value: LossConfig(**{opt: value}), exc, opt)
case("LossConfig", "int-valid", lambda: LossConfig(alpha_tilde=2, beta=0), lambda c: isinstance(c.alpha_tilde, float))
case("LossConfig", "numpy-like-valid", lambda: LossConfig(alpha_tilde=torch.tensor(0.5).item()),
     lambda c: c.alpha_tilde == 0.5)
case("LossConfig", "numpy-scalars-valid", lambda: LossConfig(alpha_tilde=np.float32(0.5), beta=np.int64(1)),
     lambda c: (c.alpha_tilde, c.beta) == (0.5, 1.0) and type(c.alpha_tilde) is float)
case("LossConfig", "value_at-case", lambda: LossConfig(value_at="Current"), ValueError, "value_at")
case("LossConfig", "reward_norm-int", lambda: LossConfig(reward_norm=1), ValueError, "reward_norm")
case("LossConfig", "ignore_index-none", lambda: LossConfig(ignore_index=None), TypeError, "ignore_index")
case("LossConfig", "ignore_index-numpy-valid", lambda: LossConfig(ignore_index=np.int64(-1)),
     lambda c: type(c.ignore_index) is int and c.ignore_index == -1)
case("LossConfig", "ignore_index-numpy-bool", lambda: LossConfig(ignore_index=np.bool_(False)), TypeError,
     "ignore_index must be an int")
case("LossConfig", "unknown-keyword", lambda: LossConfig(alpha=1.0), TypeError, "alpha")
case("LossConfig", "from_options-unknown", lambda: LossConfig.from_options(None, betta=0.1), TypeError,
     "unknown loss option(s) betta")
case("LossConfig", "from_options-bad-config", lambda: LossConfig.from_options("defaults"), TypeError,
     "config must be a LossConfig")
case("LossConfig", "from_options-bad-value", lambda: LossConfig.from_options(LossConfig(), gamma=-1.0), ValueError,
     "gamma")
case("LossConfig", "frozen", lambda: setattr(LossConfig(), "beta", 1.0), Exception, "")


@pytest.mark.parametrize(("call", "expected", "fragment"), CASES)
def test_bad_input(call, expected, fragment):
    if isinstance(expected, type) or isinstance(expected, tuple):
        with pytest.raises(expected) as info:
            call()
        assert fragment in str(info.value), str(info.value)
    else:
        result = call()
        assert expected(result), result


def test_case_count():
    """The table keeps its breadth (issue 31 asks for 170+ cases over the surfaces)."""
    assert len(CASES) >= 170
