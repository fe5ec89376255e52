"""The chunked backend against the reference: loss, metrics and every gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import loss_and_grads, make_inputs
from qadapter_kernels.chunked import auto_chunk_size

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_agree(inputs, tol, **kwargs):
    ref, ref_grads = loss_and_grads(inputs, backend="reference", **kwargs)
    got, got_grads = loss_and_grads(inputs, backend="chunked", **kwargs)
    assert torch.isfinite(got.loss)
    for field in ("loss", "bt_loss", "chi2_loss", "chosen_rewards", "rejected_rewards", "margin"):
        assert rel_err(getattr(got, field), getattr(ref, field)) <= tol, field
    assert set(got_grads) == set(ref_grads)
    for name in ref_grads:
        assert got_grads[name].dtype == inputs[name].dtype
        assert rel_err(got_grads[name], ref_grads[name]) <= tol, name


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 10_000])
@pytest.mark.parametrize("value_at", ["current", "next"])
@pytest.mark.parametrize("reward_norm", ["padded", "mean", "sum"])
def test_chunk_sizes_and_modes(chunk_size, value_at, reward_norm):
    x = make_inputs(seed=chunk_size)
    assert_agree(x, TOL[torch.float32], chunk_size=chunk_size, value_at=value_at, reward_norm=reward_norm)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head", ["shared", "q_weight", "q_weight+bias"])
def test_dtypes_and_heads(dtype, head):
    x = make_inputs(batch=6, seq=11, hidden=32, vocab=97, dtype=dtype, seed=7,
                    q_head=head != "shared", q_bias=head == "q_weight+bias")
    assert_agree(x, TOL[dtype], chunk_size=5, alpha_tilde=0.8, alpha_0=0.05)


@pytest.mark.parametrize("hyper", [dict(gamma=0.0), dict(beta=0.0), dict(gamma=0.0, beta=0.0), dict(alpha_0=0.0)])
def test_degenerate_hyper_parameters(hyper):
    assert_agree(make_inputs(seed=2, q_head=True, q_bias=True), TOL[torch.float32], chunk_size=4, **hyper)


def test_bias_without_separate_weight():
    x = make_inputs(seed=4, q_bias=True)
    assert_agree(x, TOL[torch.float32], chunk_size=7)


def test_frozen_inputs_get_no_gradient():
    x = make_inputs(seed=9)
    base = x["base_hidden"].requires_grad_()
    weight = x["weight"].requires_grad_()
    from qadapter_kernels import qadapter_loss

    for backend in ("reference", "chunked"):
        out = qadapter_loss(base, x["q_hidden"], weight, x["labels"], backend=backend)
        out.loss.backward()
        assert base.grad is None and weight.grad is None
        assert x["q_hidden"].grad is not None and torch.isfinite(x["q_hidden"].grad).all()
        x["q_hidden"].grad = None


def test_no_grad_skips_expected_weight():
    """Under no_grad the chunked forward gives the same loss (it skips the P @ Wq GEMM)."""
    x = make_inputs(seed=12)
    from qadapter_kernels import qadapter_loss

    with torch.no_grad():
        fast = qadapter_loss(**x, backend="chunked", chunk_size=4)
    ref = qadapter_loss(**x, backend="reference")
    assert rel_err(fast.loss, ref.loss) <= 1e-5


def test_auto_chunk_size_respects_budget():
    assert auto_chunk_size(10_000, 1000, torch.float32, torch.device("cpu"), budget=12_000 * 50) == 50
    assert auto_chunk_size(10, 1000, torch.float32, torch.device("cpu"), budget=2**40) == 10
    assert auto_chunk_size(10, 10**9, torch.bfloat16, torch.device("cpu"), budget=1) == 1


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.integers(1, 3),
    seq=st.integers(2, 8),
    hidden=st.integers(1, 12),
    vocab=st.integers(1, 40),
    chunk=st.integers(1, 20),
    alpha_tilde=st.floats(0.05, 3.0),
    alpha_0=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 1.5),
    beta=st.floats(0.0, 1.0),
    value_at=st.sampled_from(["current", "next"]),
    reward_norm=st.sampled_from(["padded", "mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_property_chunked_matches_reference(pairs, seq, hidden, vocab, chunk, seed, **hyper):
    x = make_inputs(batch=2 * pairs, seq=seq, hidden=hidden, vocab=vocab, dtype=torch.float64, seed=seed,
                    prompt_only_row=False)
    x["labels"][0, -1] = 0  # at least one scored token
    assert_agree(x, 1e-9, chunk_size=chunk, **hyper)
