"""Bad input gets a clear error naming the argument and what was expected."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import make_inputs

from qadapter_kernels import QAdapterLoss, combine_logits, combined_logprobs, qadapter_loss


def call(x, **kwargs):
    return qadapter_loss(**{**x, **kwargs})


@pytest.fixture
def x():
    return make_inputs(batch=4, seq=6, hidden=8, vocab=13, seed=1)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda x: dict(base_hidden=x["base_hidden"][:3], q_hidden=x["q_hidden"][:3].detach(), labels=x["labels"][:3]),
         ValueError, "B=3"),
        (lambda x: dict(base_hidden=x["base_hidden"][:0], q_hidden=x["q_hidden"][:0].detach(), labels=x["labels"][:0]),
         ValueError, "B=0"),
        (lambda x: dict(q_hidden=x["q_hidden"][0]), ValueError, "q_hidden must be [B, T, d]"),
        (lambda x: dict(base_hidden=x["base_hidden"][:, :-1]), ValueError, "base_hidden must have q_hidden's shape"),
        (lambda x: dict(base_hidden=x["base_hidden"][:, :1], q_hidden=x["q_hidden"][:, :1].detach(),
                        labels=x["labels"][:, :1]), ValueError, "T=1"),
        (lambda x: dict(base_hidden=x["base_hidden"].double()), TypeError, "base_hidden must have q_hidden's dtype"),
        (lambda x: dict(q_hidden=x["q_hidden"].long()), TypeError, "q_hidden must be float16"),
        (lambda x: dict(weight=x["weight"][:, :-1]), ValueError, "weight must be [V, d] with d=8"),
        (lambda x: dict(weight=x["weight"].half()), TypeError, "weight must have the hidden states' dtype"),
        (lambda x: dict(q_weight=x["weight"][:-1]), ValueError, "q_weight must be [V, d] = [13, 8]"),
        (lambda x: dict(q_bias=torch.zeros(12)), ValueError, "q_bias must be [V] = [13]"),
        (lambda x: dict(q_bias=torch.zeros(13, dtype=torch.float64)), TypeError, "q_bias must have"),
        (lambda x: dict(labels=x["labels"].float()), TypeError, "labels must be an integer tensor"),
        (lambda x: dict(labels=x["labels"][:, :-1]), ValueError, "labels must be [B, T] = [4, 6]"),
        (lambda x: dict(labels=x["labels"].masked_fill(x["labels"] >= 0, 13)), ValueError, r"labels must lie in \[0, 13\)"),
        (lambda x: dict(labels=x["labels"].masked_fill(x["labels"] >= 0, -3)), ValueError, "found -3"),
        (lambda x: dict(labels=torch.full_like(x["labels"], -100)), ValueError, "score no token"),
        (lambda x: dict(labels=x["labels"].tolist()), TypeError, "labels must be a torch.Tensor"),
        (lambda x: dict(value_at="previous"), ValueError, "value_at must be one of 'current', 'next'"),
        (lambda x: dict(reward_norm="avg"), ValueError, "reward_norm must be one of"),
        (lambda x: dict(backend="fastest"), ValueError, "backend must be one of"),
        (lambda x: dict(alpha_tilde=0.0), ValueError, "alpha_tilde must be > 0"),
        (lambda x: dict(alpha_tilde=-1.0), ValueError, "alpha_tilde must be > 0"),
        (lambda x: dict(alpha_tilde=float("nan")), ValueError, "alpha_tilde must be finite"),
        (lambda x: dict(beta=-0.1), ValueError, "beta must be >= 0"),
        (lambda x: dict(gamma="1"), TypeError, "gamma must be a real number"),
        (lambda x: dict(chunk_size=0), ValueError, "chunk_size must be an integer >= 1"),
        (lambda x: dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (lambda x: dict(total_pairs=4), ValueError, "total_pairs and total_tokens go together"),
        (lambda x: dict(total_pairs=4, total_tokens=100), ValueError, 'need reward_norm="mean" or "sum"'),
        (lambda x: dict(total_pairs=1, total_tokens=100, reward_norm="mean"), ValueError,
         "total_pairs must be an integer >= 2 (this batch's own count); got 1"),
        (lambda x: dict(total_pairs=2.0, total_tokens=100, reward_norm="sum"), TypeError,
         "total_pairs must be an integer"),
        (lambda x: dict(total_pairs=8, total_tokens=1, reward_norm="sum"), ValueError, "total_tokens must be an integer >="),
    ],
)
def test_bad_input_names_the_argument(x, change, error, pattern):
    with pytest.raises(error, match=re.escape(pattern) if "\\" not in pattern else pattern):
        call(x, **change(x))


def test_labels_at_last_position_are_never_checked_out_of_range(x):
    """labels[:, 0] is never an action (the op shifts), so any value there is accepted."""
    labels = x["labels"].clone()
    labels[:, 0] = 10_000
    assert torch.isfinite(call(x, labels=labels).loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a device mismatch")
def test_device_mismatch(x):
    with pytest.raises(ValueError, match="weight must be on the hidden states' device"):
        call(x, weight=x["weight"].cuda())


def test_module_validates_options_at_construction():
    with pytest.raises(ValueError, match="value_at"):
        QAdapterLoss(value_at="nope")
    with pytest.raises(ValueError, match="backend"):
        QAdapterLoss(backend="nope")
    with pytest.raises(ValueError, match="chunk_size"):
        QAdapterLoss(chunk_size=-1)
    # Gradient filtering on the backend that computes the exact gradient only: refused as it is asked
    # for, not at the first call; "auto" picks its backend per device, so it takes it.
    for eps in (1e-3, "auto"):
        with pytest.raises(ValueError, match=re.escape(f"grad_filter_eps={eps!r} asks for gradient filtering, "
                                                       "which the reference backend does not implement")):
            QAdapterLoss(backend="reference", grad_filter_eps=eps)
        assert QAdapterLoss(backend="auto", grad_filter_eps=eps).config.grad_filter_eps == eps
    assert QAdapterLoss(backend="reference", grad_filter_eps=0).backend == "reference"


def test_unavailable_backend_says_why(x):
    from qadapter_kernels import backends

    missing = [name for name, status in backends().items() if not status.available]
    for name in missing:
        with pytest.raises(RuntimeError, match=f"backend '{name}' is not available: .+"):
            call(x, backend=name)


def test_combine_errors():
    z = torch.randn(2, 5)
    with pytest.raises(ValueError, match="q_values must have base_logits' shape"):
        combine_logits(z, torch.randn(2, 4))
    with pytest.raises(ValueError, match="alpha_tilde must be > 0"):
        combine_logits(z, z, alpha_tilde=0)
    with pytest.raises(ValueError, match="weight must be"):
        combined_logprobs(torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 3))


@pytest.mark.parametrize(
    "options, error, pattern",
    [
        (dict(alpha_0=-0.01), ValueError, "alpha_0 must be >= 0"),
        (dict(gamma=-1.0), ValueError, "gamma must be >= 0"),
        (dict(alpah_0=0.1), TypeError, "unknown loss option(s) alpah_0"),
        (dict(config="padded"), TypeError, "config must be a LossConfig"),
    ],
)
def test_loss_options_are_validated(x, options, error, pattern):
    with pytest.raises(error, match=re.escape(pattern)):
        call(x, **options)
    with pytest.raises(error, match=re.escape(pattern)):
        QAdapterLoss(**options)


@pytest.mark.parametrize("chunk_size", [-1, 0, 2.5, True])
def test_every_chunk_size_entry_validates_it(x, chunk_size):
    """combined_logprobs(chunk_size=-1) returned uninitialised memory; 0 silently meant automatic."""
    error = TypeError if isinstance(chunk_size, (bool, float)) else ValueError
    with pytest.raises(error, match=re.escape("chunk_size must be an integer >= 1 or None (automatic)")):
        combined_logprobs(x["base_hidden"], x["q_hidden"].detach(), x["weight"], chunk_size=chunk_size)
    with pytest.raises(error, match=re.escape("chunk_size must be an integer >= 1 or None (automatic)")):
        call(x, chunk_size=chunk_size)


@pytest.mark.parametrize("backend", ["chunked", "chunked-triton", "cuda"])
def test_a_second_derivative_is_refused_not_wrong(x, backend):
    """The fused backwards are first-order (their saved ``E_p[Wq]`` is a constant): a Hessian-vector
    product or a gradient penalty through them is an error, never a silently partial result."""
    from qadapter_kernels import registry

    status = registry.status(backend)
    if not status.available:
        pytest.skip(f"{backend}: {status.reason}")
    hq = x["q_hidden"].detach().clone().requires_grad_()
    loss = call(x, q_hidden=hq, backend=backend).loss
    (grad,) = torch.autograd.grad(loss, hq, create_graph=True)
    with pytest.raises(RuntimeError, match="backward is first-order"):
        torch.autograd.grad(grad.square().sum(), hq)



def test_a_float32_backend_named_for_float64_says_so_before_running(x, monkeypatch):
    """A backend whose kernels stop at float32 refuses float64 inputs up front, naming those that take them."""
    from qadapter_kernels import registry

    monkeypatch.setattr(registry, "status", lambda name: registry.BackendStatus(name, True))  # runnable or not here
    doubled = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
    with pytest.raises(TypeError, match=r"backend 'chunked-triton' takes float16, bfloat16 and float32 inputs, got "
                                        r"float64 \(float64 runs on 'reference', 'chunked'"):
        call(doubled, backend="chunked-triton")


def test_torch_func_transforms_name_the_backend_that_runs_under_them(x):
    """The fused backwards are autograd Functions without ``setup_context``: under ``torch.func.grad``
    the chunked backends say so and name the reference, which computes the same gradient."""
    inputs = {k: v.detach() if k == "q_hidden" else v for k, v in x.items()}

    def loss_of(q_hidden, backend):
        return call(inputs, q_hidden=q_hidden, backend=backend).loss

    with pytest.raises(RuntimeError, match="torch.func's transforms cannot run; backend='reference'"):
        torch.func.grad(loss_of)(inputs["q_hidden"], "chunked")
    expected = torch.autograd.grad(loss_of(x["q_hidden"], "reference"), x["q_hidden"])[0]
    torch.testing.assert_close(torch.func.grad(loss_of)(inputs["q_hidden"], "reference"), expected)


def test_the_whole_vocabulary_passes_refuse_vmap_by_name(x):
    """They write their chunks into one preallocated output, which vmap cannot batch; they take any
    leading shape, which batches the same."""
    from qadapter_kernels import token_logprobs, vocabulary_pass

    base, weight, targets = x["base_hidden"].detach(), x["weight"].detach(), x["labels"].clamp(min=0)
    hqs = torch.stack([x["q_hidden"].detach(), x["q_hidden"].detach() + 0.1])
    bases, targets = base.expand_as(hqs), targets.expand(hqs.shape[:-1])
    for name, fn in (("combined_logprobs", lambda hq: combined_logprobs(bases[:len(hq)], hq, weight)),
                     ("vocabulary_pass", lambda hq: vocabulary_pass(bases[:len(hq)], hq, weight, measures=("kl",)).kl),
                     ("token_logprobs", lambda hq: token_logprobs(hq, weight, targets[:len(hq)]))):
        with pytest.raises(RuntimeError, match=f"{name} writes its chunks into one output, which torch.vmap cannot "
                                               "batch; it takes hidden states of any leading shape"):
            torch.func.vmap(lambda hq, fn=fn: fn(hq.unsqueeze(0)))(hqs)
        batched = fn(hqs)  # the batch as a leading dimension
        torch.testing.assert_close(batched[1:], fn(hqs[1:]))
