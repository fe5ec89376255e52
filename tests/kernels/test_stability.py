"""Finite inputs give finite losses and gradients, even at extreme logit scales."""

from __future__ import annotations

import pytest
import torch
from helpers import loss_and_grads, make_inputs


@pytest.mark.parametrize("backend", ["reference", "chunked"])
@pytest.mark.parametrize("value_at", ["current", "next"])
def test_huge_logits_small_temperature(backend, value_at):
    x = make_inputs(seed=21, q_head=True, q_bias=True)
    # Rescale so that the logits reach magnitude ~1e4.
    x["weight"] = x["weight"] * 2e3
    x["q_weight"] = (x["q_weight"].detach() * 2e3).requires_grad_()
    logits = x["base_hidden"] @ x["weight"].T
    assert logits.abs().max() > 5e3
    out, grads = loss_and_grads(x, backend=backend, alpha_tilde=0.05, value_at=value_at, chunk_size=3)
    assert torch.isfinite(out.loss)
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name


def test_row_without_scored_token_contributes_zero_reward():
    x = make_inputs(seed=22)
    for backend in ("reference", "chunked"):
        out, grads = loss_and_grads(x, backend=backend)
        assert out.chosen_rewards[1].item() == 0.0
        assert torch.isfinite(out.loss)
        assert grads["q_hidden"][1].abs().max() == 0.0  # nothing in that row is scored
