"""The building blocks other losses are made of: token statistics, per-sequence rewards, per-pair BT
terms and the log-probs of given targets, each against a full-logits computation and the reference
backend, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import make_inputs

from qadapter_kernels import (
    LossConfig,
    TokenStats,
    bt_terms,
    combine_logits,
    combined_logprobs_at,
    qadapter_loss,
    qadapter_token_stats,
    registry,
    sequence_rewards,
)

NAMES = [name for name in registry.BACKEND_NAMES if name not in ("auto", "reference")]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRAINABLE = ("q_hidden", "q_weight", "q_bias")


def available(name: str) -> str:
    status = registry.status(name)
    if not status.available:
        pytest.skip(f"{name}: {status.reason}")
    return name


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def leaves(inputs):
    """Fresh copies of the float inputs, the trainable ones requiring grad."""
    return {k: v.detach().clone().requires_grad_(k in TRAINABLE) for k, v in inputs.items() if v.is_floating_point()}


def grads_of(value: torch.Tensor, inputs: dict) -> dict:
    names = [k for k in TRAINABLE if k in inputs]
    return dict(zip(names, torch.autograd.grad(value, [inputs[k] for k in names])))


def full_logits(x, config: LossConfig):
    """float64 Q-values, soft values and base log-probs over whole rows: the formulas of docs/design.md."""
    q_weight = x.get("q_weight", x["weight"])
    q = x["q_hidden"].double() @ q_weight.double().T
    if "q_bias" in x:
        q = q + x["q_bias"].double()
    log_pi1 = torch.log_softmax(x["base_hidden"].double() @ x["weight"].double().T, dim=-1)
    value = config.alpha_tilde * torch.logsumexp((q + config.alpha_0 * log_pi1) / config.alpha_tilde, dim=-1)
    return q, value, log_pi1


@pytest.mark.parametrize("name", ["reference", *NAMES])
@pytest.mark.parametrize("value_at", ["current", "next"])
def test_token_stats_are_the_formulas_at_their_rows_and_positions(name, value_at):
    available(name)
    config = LossConfig(alpha_tilde=0.7, alpha_0=0.2, gamma=0.9, value_at=value_at)
    x = make_inputs(batch=5, seq=10, hidden=24, vocab=61, seed=3, q_head=True, q_bias=True, device=DEVICE)
    stats = qadapter_token_stats(**x, config=config, backend=name, chunk_size=4)
    assert isinstance(stats, TokenStats) and stats.config == config
    q, value, _ = full_logits(x, config)
    rows, positions = stats.rows, stats.positions
    actions = x["labels"][rows, positions + 1]
    assert bool((actions != -100).all()) and rows.shape == positions.shape == stats.rewards.shape
    assert rel_err(stats.q_taken, q[rows, positions, actions]) <= 1e-5
    assert rel_err(stats.value, value[rows, positions]) <= 1e-5
    if value_at == "current":
        soft = value[rows, positions]
    else:  # V_{t+1} where t+1 is a position (< T-1 = 9) whose own action is scored
        nxt = positions + 1
        scored_next = (nxt < 9) & (x["labels"][rows, (nxt + 1).clamp(max=9)] != -100)
        soft = torch.where(scored_next, value[rows, nxt], 0.0)
    assert rel_err(stats.rewards, q[rows, positions, actions] - 0.9 * soft) <= 1e-5


@pytest.mark.parametrize("reward_norm", ["padded", "mean", "sum"])
@pytest.mark.parametrize("value_at", ["current", "next"])
def test_the_loss_is_its_building_blocks(reward_norm, value_at):
    """``bt_terms(sequence_rewards(stats)).mean() + beta * mean(r^2)`` is qadapter_loss, gradients included."""
    x = make_inputs(batch=6, seq=11, hidden=24, vocab=53, seed=4, q_head=True, q_bias=True, device=DEVICE)
    options = dict(reward_norm=reward_norm, value_at=value_at, beta=0.3, alpha_0=0.1)
    ref = leaves(x)
    out = qadapter_loss(**ref, labels=x["labels"], backend="reference", **options)
    built = leaves(x)
    stats = qadapter_token_stats(**built, labels=x["labels"], chunk_size=5, **options)
    seq = sequence_rewards(stats)
    loss = bt_terms(seq).mean() + 0.3 * stats.rewards.square().mean()
    assert rel_err(loss, out.loss) <= 1e-6
    assert rel_err(seq, torch.cat([out.chosen_rewards, out.rejected_rewards])) <= 1e-6
    ref_grads, got_grads = grads_of(out.loss, ref), grads_of(loss, built)
    for key, grad in ref_grads.items():
        assert rel_err(got_grads[key], grad) <= 1e-5, key


@pytest.mark.parametrize("name", NAMES)
def test_another_loss_on_the_statistics_matches_the_reference_backend(name):
    """An IPO-style squared loss on the per-sequence rewards plus a term on the soft values: a loss
    the package does not ship, built on the same statistics, with every gradient."""
    available(name)
    x = make_inputs(batch=6, seq=11, hidden=40, vocab=203, seed=6, q_head=True, q_bias=True, device=DEVICE)

    def ipo(backend):
        inputs = leaves(x)
        stats = qadapter_token_stats(**inputs, labels=x["labels"], backend=backend, chunk_size=3,
                                     reward_norm="mean", alpha_tilde=0.8)
        seq = sequence_rewards(stats)
        loss = (seq[:3] - seq[3:] - 0.5).square().mean() + 0.01 * stats.value.square().mean()
        return loss, grads_of(loss, inputs)

    (ref, ref_grads), (got, got_grads) = ipo("reference"), ipo(name)
    assert rel_err(got, ref) <= 1e-5
    for key, grad in ref_grads.items():
        assert rel_err(got_grads[key], grad) <= 1e-5, key


def test_token_stats_take_unpaired_rows_and_bt_terms_need_pairs():
    x = make_inputs(batch=3, seq=8, seed=2)
    stats = qadapter_token_stats(**x)
    assert sequence_rewards(stats).shape == (3,)
    with pytest.raises(ValueError, match="sequence_rewards must be \\[B\\] with B even"):
        bt_terms(sequence_rewards(stats))
    with pytest.raises(TypeError, match="stats must be the TokenStats"):
        sequence_rewards((stats.q_taken, stats.value))
    with pytest.raises(ValueError, match="must be even"):
        qadapter_loss(**x)


def test_positions_follow_ragged_masks():
    labels = torch.tensor([[-100, 5, 6, -100, 7], [-100, -100, -100, 8, 9]])
    x = make_inputs(batch=2, seq=5, vocab=13, seed=1)
    stats = qadapter_token_stats(x["base_hidden"], x["q_hidden"], x["weight"], labels)
    assert stats.rows.tolist() == [0, 0, 0, 1, 1]
    assert stats.positions.tolist() == [0, 1, 3, 2, 3]


def full_target_logprobs(x, targets, alpha_tilde, alpha_0, softcap=None):
    """log pi~ and log pi1 of targets [B, T] from whole float64 rows; 0 where the target is -100."""
    q_weight = x.get("q_weight", x["weight"])
    q = x["q_hidden"].double() @ q_weight.double().T
    if "q_bias" in x:
        q = q + x["q_bias"].double()
    z = x["base_hidden"].double() @ x["weight"].double().T
    if softcap is not None:
        q, z = softcap * torch.tanh(q / softcap), softcap * torch.tanh(z / softcap)
    index = targets.clamp(min=0).unsqueeze(-1)
    combined = combine_logits(z, q, alpha_tilde=alpha_tilde, alpha_0=alpha_0).gather(-1, index).squeeze(-1)
    base = torch.log_softmax(z, dim=-1).gather(-1, index).squeeze(-1)
    keep = targets != -100
    return combined.where(keep, 0.0), base.where(keep, 0.0)


@pytest.mark.parametrize("name", ["reference", *NAMES])
@pytest.mark.parametrize("chunk_size, softcap", [(None, None), (1, None), (4, None), (4, 0.7)])
def test_combined_logprobs_at_targets(name, chunk_size, softcap):
    available(name)
    x = make_inputs(batch=4, seq=9, hidden=24, vocab=53, seed=11, q_head=True, q_bias=True, device=DEVICE)
    targets = x["labels"][:, 1:]
    hidden = {k: v[:, :-1] if k in ("base_hidden", "q_hidden") else v for k, v in leaves(x).items()}
    got = combined_logprobs_at(**hidden, targets=targets, alpha_tilde=0.6, alpha_0=0.3, backend=name,
                               chunk_size=chunk_size, logit_softcap=softcap)
    assert got.combined.shape == got.base.shape == targets.shape and got.combined.dtype == torch.float32
    assert not got.base.requires_grad
    full = {k: v.detach().clone().requires_grad_(k in TRAINABLE) for k, v in hidden.items()}
    combined, base = full_target_logprobs(full, targets, 0.6, 0.3, softcap)
    assert rel_err(got.combined, combined) <= 1e-5 and rel_err(got.base, base) <= 1e-5
    assert bool((got.combined[targets == -100] == 0).all())
    # A weighted sum reaches every trainable input exactly as the full-logits version does.
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(DEVICE)
    got_grads = grads_of((got.combined * weights).sum(), hidden)
    for key, grad in grads_of((combined * weights).sum(), full).items():
        assert rel_err(got_grads[key], grad) <= 1e-5, key


def test_dpo_on_the_customized_policy():
    """DPO of pi~ against pi1 from combined_logprobs_at, against the same loss on whole float64 rows."""
    x = make_inputs(batch=6, seq=11, hidden=24, vocab=53, seed=13, q_head=True, device=DEVICE)
    targets = x["labels"][:, 1:]

    def dpo(combined, base):
        ratios = (combined - base).sum(dim=1)
        return -F.logsigmoid(0.1 * (ratios[:3] - ratios[3:])).mean()

    ours = {k: v[:, :-1] if k in ("base_hidden", "q_hidden") else v for k, v in leaves(x).items()}
    theirs = {k: v.detach().clone().requires_grad_(k in TRAINABLE) for k, v in ours.items()}
    loss = dpo(*combined_logprobs_at(**ours, targets=targets, chunk_size=4))
    expected = dpo(*full_target_logprobs(theirs, targets, 1.0, 0.01))
    assert rel_err(loss, expected) <= 1e-5
    expected_grads = grads_of(expected, theirs)
    for key, grad in grads_of(loss, ours).items():
        assert rel_err(grad, expected_grads[key]) <= 1e-5, key


def test_combined_logprobs_at_any_leading_shape_and_nothing_scored():
    x = make_inputs(batch=2, seq=6, hidden=8, vocab=17, seed=3)
    flat = combined_logprobs_at(x["base_hidden"].reshape(-1, 8), x["q_hidden"].reshape(-1, 8), x["weight"],
                                x["labels"].reshape(-1))
    shaped = combined_logprobs_at(x["base_hidden"], x["q_hidden"], x["weight"], x["labels"])
    assert torch.equal(flat.combined.reshape(2, 6), shaped.combined)
    none = combined_logprobs_at(x["base_hidden"], x["q_hidden"], x["weight"], torch.full((2, 6), -100))
    assert bool((none.combined == 0).all()) and bool((none.base == 0).all())


def test_nothing_scored_still_reaches_the_trainable_inputs():
    """A micro-batch with no scored target gives zero gradients, not a graph-less error, to what trains."""
    x = leaves(make_inputs(batch=2, seq=6, hidden=8, vocab=17, seed=3, q_head=True, q_bias=True))
    none = combined_logprobs_at(**x, targets=torch.full((2, 6), -100))
    none.combined.sum().backward()
    for key in TRAINABLE:
        assert x[key].grad is not None and not bool(x[key].grad.any()), key
    assert not none.base.requires_grad and x["base_hidden"].grad is None and x["weight"].grad is None


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(targets=torch.zeros(2, 5, dtype=torch.long)), ValueError, "targets must be the hidden states' leading"),
        (dict(targets=torch.zeros(2, 6)), TypeError, "targets must be an integer tensor"),
        (dict(targets=torch.full((2, 6), 17)), ValueError, r"targets must lie in \[0, 17\)"),
        (dict(ignore_index=-1.0), TypeError, "ignore_index must be an int"),
        (dict(alpha_tilde=0.0), ValueError, "alpha_tilde must be > 0"),
        (dict(backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_combined_logprobs_at_errors_name_the_argument(change, error, match):
    x = make_inputs(batch=2, seq=6, hidden=8, vocab=17, seed=3)
    kwargs = {"targets": x["labels"].clamp(min=0), **change}
    with pytest.raises(error, match=match):
        combined_logprobs_at(x["base_hidden"], x["q_hidden"], x["weight"], **kwargs)
