"""Under torch.autocast every entry point computes what it computes outside it, in its inputs' dtype:
the loss and its gradients (backward taken inside the region too), and the decoding measures.

A ``@`` in a lower-precision autocast region would otherwise run in bfloat16: the reference backend
(the executable spec) and the chunked backward would differ from the same call outside it."""

from __future__ import annotations

import pytest
import torch
from helpers import loss_and_grads, make_inputs

from qadapter_kernels import (
    QAdapterLoss,
    combined_logprobs,
    qadapter_loss,
    qadapter_token_stats,
    registry,
    token_logprobs,
    vocabulary_pass,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_BACKENDS = ("reference", "chunked")  # the interpreter's Triton backends are the chunked step's, slowly


def _backend(name: str) -> str:
    status = registry.status(name)
    if not status.available:
        pytest.skip(f"{name}: {status.reason}")
    return name


def _inputs():
    return make_inputs(batch=4, seq=12, hidden=32, vocab=97, q_head=True, scale=3.0, device=DEVICE)


def _loss_and_grads(inputs, name, *, backward_inside: bool):
    """As PyTorch recommends, the forward inside the region and the backward after it; or both inside."""
    leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items() if v.is_floating_point()}
    trainable = {k: v for k, v in leaves.items() if v.requires_grad}
    def grads(loss):
        return dict(zip(trainable, torch.autograd.grad(loss, list(trainable.values()))))

    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = qadapter_loss(labels=inputs["labels"], **leaves, backend=name)
        if backward_inside:
            return out, grads(out.loss)
    return out, grads(out.loss)


@pytest.mark.parametrize("name", CPU_BACKENDS if DEVICE == "cpu" else
                         [n for n in registry.BACKEND_NAMES if n != "auto"])
def test_the_loss_and_its_gradients_ignore_autocast(name):
    """The fused backwards run outside autocast even when taken inside it; the reference's backward is
    autograd's, whose ops follow the region they run in."""
    inputs = _inputs()
    outside, outside_grads = loss_and_grads(inputs, backend=_backend(name))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        stats = qadapter_token_stats(**inputs, backend=name)
    assert stats.value.dtype == torch.float32
    for backward_inside in (False, True) if name != "reference" else (False,):
        inside, inside_grads = _loss_and_grads(inputs, name, backward_inside=backward_inside)
        assert inside.loss.dtype == torch.float32
        torch.testing.assert_close(inside.loss, outside.loss, rtol=1e-6, atol=0)
        for key, grad in outside_grads.items():
            torch.testing.assert_close(inside_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_the_loss_module_ignores_autocast_as_the_function_does(name):
    """QAdapterLoss is the function with its options held: the same inside a region as outside it."""
    inputs = _inputs()
    module = QAdapterLoss(backend=_backend(name))
    results = []
    for region in (torch.autocast(DEVICE, enabled=False), torch.autocast(DEVICE, dtype=torch.bfloat16)):
        leaves = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in inputs.items()
                  if v.is_floating_point()}
        with region:
            loss = module(labels=inputs["labels"], **leaves).loss
        loss.backward()
        results.append((loss, {k: v.grad for k, v in leaves.items() if v.requires_grad}))
    (outside, outside_grads), (inside, inside_grads) = results
    torch.testing.assert_close(inside, outside, rtol=1e-6, atol=0)
    for key, grad in outside_grads.items():
        torch.testing.assert_close(inside_grads[key], grad, rtol=1e-5, atol=1e-7, msg=key)


def test_the_decoding_measures_ignore_autocast():
    inputs = _inputs()
    base, adapter, weight = inputs["base_hidden"], inputs["q_hidden"].detach(), inputs["weight"]
    targets = inputs["labels"][:, 1:].clamp(min=0)

    def measures():
        return (vocabulary_pass(base[:, :-1], adapter[:, :-1], weight, targets, measures=("logprobs", "kl")),
                token_logprobs(base[:, :-1], weight, targets), combined_logprobs(base, adapter, weight))

    (pass_out, logprobs, combined) = measures()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        (pass_in, logprobs_in, combined_in) = measures()
    for field in ("combined", "base", "kl"):
        torch.testing.assert_close(getattr(pass_in, field), getattr(pass_out, field), rtol=0, atol=0)
    torch.testing.assert_close(logprobs_in, logprobs, rtol=0, atol=0)
    torch.testing.assert_close(combined_in, combined, rtol=0, atol=0)
