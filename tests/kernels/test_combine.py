"""Inference combination: log pi~ = log_softmax((Q + alpha_0 * log pi1) / alpha~)."""

from __future__ import annotations

import pytest
import torch

from qadapter_kernels import combine_logits, combined_logprobs, combined_logprobs_at


def test_combine_logits_is_the_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 17, generator=g, dtype=torch.float64) * 4
    q = torch.randn(3, 17, generator=g, dtype=torch.float64)
    got = combine_logits(z, q, alpha_tilde=0.6, alpha_0=0.3)
    pi1 = torch.softmax(z, -1)
    unnorm = torch.exp((q + 0.3 * torch.log(pi1)) / 0.6)
    assert torch.allclose(got.exp(), unnorm / unnorm.sum(-1, keepdim=True), rtol=1e-12, atol=1e-15)


def test_alpha_0_zero_and_unit_temperature_is_softmax_of_q():
    q = torch.randn(4, 9)
    assert torch.allclose(combine_logits(torch.randn(4, 9), q, alpha_0=0.0), torch.log_softmax(q, -1), atol=1e-6)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_combined_in_float32(dtype):
    """Logits held in a model's half-precision dtype come back as float32 log-probs, the float64
    formula's of the same values to float32's precision, not log-softmaxes rounded to the logits' dtype."""
    g = torch.Generator().manual_seed(4)
    z, q = ((4 * torch.randn(3, 50, generator=g)).to(dtype) for _ in range(2))
    got = combine_logits(z, q, alpha_tilde=0.6, alpha_0=0.3)
    assert got.dtype == torch.float32
    want = torch.log_softmax((q.double() + 0.3 * torch.log_softmax(z.double(), -1)) / 0.6, -1)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_combined_logprobs_from_hidden_states(dtype, chunk_size):
    g = torch.Generator().manual_seed(1)
    hb = torch.randn(2, 5, 16, generator=g).to(dtype)
    hq = torch.randn(2, 5, 16, generator=g).to(dtype)
    w = (torch.randn(31, 16, generator=g) / 4).to(dtype)
    qw = (torch.randn(31, 16, generator=g) / 4).to(dtype)
    qb = torch.randn(31, generator=g).to(dtype)
    got = combined_logprobs(hb, hq, w, q_weight=qw, q_bias=qb, alpha_tilde=0.9, alpha_0=0.1, chunk_size=chunk_size)
    assert got.shape == (2, 5, 31) and got.dtype == torch.float32
    # The products in the inputs' dtype, the bias added in float32 (what every chunk does).
    expected = combine_logits((hb @ w.T).float(), (hq @ qw.T).float() + qb.float(), alpha_tilde=0.9, alpha_0=0.1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.logsumexp(-1), torch.zeros(2, 5), atol=1e-5)


def test_combined_logprobs_with_a_logit_softcap():
    g = torch.Generator().manual_seed(2)
    hb, hq = torch.randn(2, 3, 5, 16, generator=g)
    w = torch.randn(31, 16, generator=g) / 4
    got = combined_logprobs(hb, hq, w, alpha_tilde=0.9, alpha_0=0.1, chunk_size=4, logit_softcap=0.5)
    cap = lambda x: 0.5 * torch.tanh(x / 0.5)  # noqa: E731
    expected = combine_logits(cap(hb @ w.T), cap(hq @ w.T), alpha_tilde=0.9, alpha_0=0.1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, combined_logprobs(hb, hq, w, alpha_tilde=0.9, alpha_0=0.1), atol=1e-2)
    # Its gradient: the adapter's hidden states through the capped logits (autograd keeps tanh's output).
    picked = torch.randint(0, 31, (3, 5, 1), generator=g)
    grads = []
    for fn in (lambda x: combined_logprobs(hb, x, w, alpha_tilde=0.9, alpha_0=0.1, chunk_size=4, logit_softcap=0.5),
               lambda x: combine_logits(cap(hb @ w.T), cap(x @ w.T), alpha_tilde=0.9, alpha_0=0.1)):
        x = hq.clone().requires_grad_()
        fn(x).gather(-1, picked).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_head", [False, True])
def test_combined_logprobs_gives_the_frozen_model_no_gradient(q_head):
    """Whole rows and targets' log-probs agree in value and gradient: the gradient reaches the
    adapter's side only (pi1's hidden states and head are constants, a shared head included)."""
    g = torch.Generator().manual_seed(2)
    hb, hq = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    w, qw = torch.randn(31, 16, generator=g) / 4, torch.randn(31, 16, generator=g) / 4
    targets = torch.randint(0, 31, (2, 5), generator=g)

    def grads(fn):
        x = {"base_hidden": hb.clone().requires_grad_(), "q_hidden": hq.clone().requires_grad_(),
             "weight": w.clone().requires_grad_(), **({"q_weight": qw.clone().requires_grad_()} if q_head else {})}
        fn(x).sum().backward()
        return {k: v.grad for k, v in x.items()}

    whole = grads(lambda x: combined_logprobs(**x, alpha_0=0.3).gather(-1, targets.unsqueeze(-1)))
    at = grads(lambda x: combined_logprobs_at(**x, targets=targets, alpha_0=0.3).combined)
    assert whole["base_hidden"] is None and whole["weight"] is None
    assert at["base_hidden"] is None and at["weight"] is None
    for key in ("q_hidden", "q_weight") if q_head else ("q_hidden",):
        assert whole[key] is not None and bool(whole[key].any())
        assert torch.allclose(whole[key], at[key], rtol=1e-4, atol=1e-6), key
