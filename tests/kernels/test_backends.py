"""Every registered backend against the reference: loss, metrics and every gradient.

One test per property, parametrised over the registry: a backend that cannot run here is skipped
with the registry's reason. Without a GPU the Triton backends run in Triton's interpreter
(tests/conftest.py sets ``TRITON_INTERPRET=1``) and the CUDA backend is skipped.
"""

from __future__ import annotations

import pytest
import torch
from helpers import loss_and_grads, make_inputs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qadapter_kernels import qadapter_loss, registry

NAMES = [name for name in registry.BACKEND_NAMES if name not in ("auto", "reference")]
CHUNKED = ("chunked", "chunked-triton", "cuda")  # the backends that take chunk_size
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def backend(name: str) -> registry.Backend:
    status = registry.status(name)
    if not status.available:
        pytest.skip(f"{name}: {status.reason}")
    return registry.get(name)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


FIELDS = ("loss", "bt_loss", "chi2_loss", "chosen_rewards", "rejected_rewards", "margin")


def within(a: torch.Tensor, b: torch.Tensor, tol: float, atol: float) -> bool:
    """``a`` within ``tol`` of ``b`` relative to ``b``'s norm, or within ``atol`` (norm of the difference):
    a quantity that is exactly 0 in the reference (rewards and gradients with one vocabulary entry)
    is roundoff in another summation order, which no relative tolerance admits."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm()) <= tol * float(b.norm()) + atol


def assert_agree(name, inputs, tol, fields=FIELDS, atol=0.0, **kwargs):
    ref, ref_grads = loss_and_grads(inputs, backend="reference", **kwargs)
    got, got_grads = loss_and_grads(inputs, backend=name, **kwargs)
    assert torch.isfinite(got.loss)
    for field in fields:
        assert within(getattr(got, field), getattr(ref, field), tol, atol), (field, rel_err(getattr(got, field), getattr(ref, field)))
    assert set(got_grads) == set(ref_grads)
    for grad_name, grad in ref_grads.items():
        assert got_grads[grad_name].dtype == inputs[grad_name].dtype, grad_name
        assert within(got_grads[grad_name], grad, tol, atol), (grad_name, rel_err(got_grads[grad_name], grad))
    return got, ref


def dtypes_of(name: str) -> list[torch.dtype]:
    """What a backend is checked in: float32, float16, bfloat16, and float64 where it computes in it."""
    out = [torch.float32, torch.float16, torch.bfloat16]
    if registry.get(name).float64:
        out.append(torch.float64)
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("head", ["shared", "q_weight", "q_weight+bias"])
def test_dtypes_and_heads(name, head):
    backend(name)
    for dtype in dtypes_of(name):
        x = make_inputs(batch=6, seq=11, hidden=40, vocab=203, dtype=dtype, seed=7, device=DEVICE,
                        q_head=head != "shared", q_bias=head == "q_weight+bias")
        assert_agree(name, x, TOL[dtype], chunk_size=5, alpha_tilde=0.8, alpha_0=0.05)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("head", ["shared", "q_weight+bias"])
def test_logit_softcap(name, head):
    """Gemma-2's soft-capped logits, s * tanh(logits / s), with a cap that bites (logits up to ~3s)."""
    backend(name)
    for dtype in dtypes_of(name):
        x = make_inputs(batch=6, seq=11, hidden=40, vocab=203, dtype=dtype, seed=8, device=DEVICE,
                        q_head=head != "shared", q_bias=head != "shared")
        got, _ = assert_agree(name, x, TOL[dtype], chunk_size=5, alpha_tilde=0.8, alpha_0=0.05, logit_softcap=0.7)
        uncapped, _ = loss_and_grads(x, backend=name, chunk_size=5, alpha_tilde=0.8, alpha_0=0.05)
        assert rel_err(got.loss, uncapped.loss) > 0.1  # the cap changes the loss


def test_logit_softcap_must_be_positive():
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="logit_softcap must be"):
            qadapter_loss(**make_inputs(), logit_softcap=bad)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value_at", ["current", "next"])
@pytest.mark.parametrize("reward_norm", ["padded", "mean", "sum"])
def test_loss_modes(name, value_at, reward_norm):
    backend(name)
    x = make_inputs(batch=6, seq=11, hidden=40, vocab=203, seed=5, device=DEVICE)
    assert_agree(name, x, TOL[torch.float32], chunk_size=4, value_at=value_at, reward_norm=reward_norm)


@pytest.mark.parametrize("name", CHUNKED)
@pytest.mark.parametrize("chunk_size", [1, 3, 16, 10_000])
def test_chunk_sizes(name, chunk_size):
    backend(name)
    x = make_inputs(seed=chunk_size, q_head=True, q_bias=True, device=DEVICE)
    assert_agree(name, x, TOL[torch.float32], chunk_size=chunk_size, value_at="next")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("hyper", [dict(gamma=0.0), dict(beta=0.0), dict(alpha_0=0.0, beta=0.0)])
def test_degenerate_hyper_parameters(name, hyper):
    backend(name)
    x = make_inputs(batch=6, seq=11, hidden=40, vocab=203, seed=2, q_head=True, q_bias=True, device=DEVICE)
    assert_agree(name, x, TOL[torch.float32], chunk_size=4, **hyper)


@pytest.mark.parametrize("name", NAMES)
def test_bias_on_the_shared_head(name):
    backend(name)
    x = make_inputs(batch=6, seq=11, hidden=40, vocab=203, seed=8, q_bias=True, device=DEVICE)
    assert_agree(name, x, TOL[torch.float32], chunk_size=7)


@pytest.mark.parametrize("name", ["reference", *NAMES])
@pytest.mark.parametrize("reward_norm", ["mean", "sum"])
def test_shares_of_parts_add_up_to_the_whole_batch(name, reward_norm):
    """Gradient accumulation made exact: the parts' losses with the whole batch's totals add up to
    the whole batch's loss, gradients included (a row with no scored token among them)."""
    backend(name)
    x = make_inputs(batch=8, seq=11, seed=2, q_head=True, q_bias=True, device=DEVICE)
    options = dict(backend=name, reward_norm=reward_norm, beta=0.3, chunk_size=5)
    whole, whole_grads = loss_and_grads(x, **options)
    totals = dict(total_pairs=4, total_tokens=int((x["labels"][:, 1:] != -100).sum()))
    parts = [torch.tensor(rows, device=DEVICE) for rows in ([0, 4], [1, 2, 5, 6], [3, 7])]
    summed, summed_grads = 0.0, {}
    for rows in parts:
        part = {k: v[rows] if k in ("base_hidden", "q_hidden", "labels") else v for k, v in x.items()}
        out, grads = loss_and_grads(part, **options, **totals)
        summed = summed + out.loss.detach()
        for key, grad in grads.items():
            if key == "q_hidden":
                grad = torch.zeros_like(x["q_hidden"]).index_copy(0, rows, grad)
            summed_grads[key] = summed_grads.get(key, 0) + grad
    assert rel_err(summed, whole.loss) <= TOL[torch.float32]
    for key, grad in whole_grads.items():
        assert rel_err(summed_grads[key], grad) <= TOL[torch.float32], key


@pytest.mark.parametrize("name", NAMES)
def test_frozen_inputs_get_no_gradient(name):
    backend(name)
    x = make_inputs(seed=9, device=DEVICE)
    base, weight = x["base_hidden"].requires_grad_(), x["weight"].requires_grad_()
    qadapter_loss(base, x["q_hidden"], weight, x["labels"], backend=name).loss.backward()
    assert base.grad is None and weight.grad is None
    assert x["q_hidden"].grad is not None and torch.isfinite(x["q_hidden"].grad).all()


@pytest.mark.parametrize("name", NAMES)
def test_forward_only_under_no_grad(name):
    """Under no_grad the forward gives the training loss (the chunked ones skip the P @ Wq GEMM)."""
    backend(name)
    x = make_inputs(seed=12, device=DEVICE)
    with torch.no_grad():
        got = qadapter_loss(**x, backend=name, chunk_size=4)
    assert rel_err(got.loss, qadapter_loss(**x, backend="reference").loss) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("head", ["shared", "q_weight+bias"])
def test_bfloat16_on_gpu(name, head):
    backend(name)
    x = make_inputs(batch=8, seq=65, hidden=200, vocab=3001, dtype=torch.bfloat16, seed=21,
                    q_head=head != "shared", q_bias=head != "shared", device="cuda")
    assert_agree(name, x, TOL[torch.bfloat16], chunk_size=100)


# What the property tests draw besides the shapes and alpha~: pairs, chunking, options, the seed.
RANDOM_CASE = dict(
    pairs=st.integers(1, 3),
    chunk=st.integers(1, 20),
    alpha_0=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 1.5),
    beta=st.floats(0.0, 1.0),
    value_at=st.sampled_from(["current", "next"]),
    reward_norm=st.sampled_from(["padded", "mean", "sum"]),
    seed=st.integers(0, 2**16),
)


@pytest.mark.parametrize("name", [n for n in NAMES if n in ("chunked",)])
@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seq=st.integers(2, 8), hidden=st.integers(1, 12), vocab=st.integers(1, 40),
       alpha_tilde=st.floats(0.05, 3.0), **RANDOM_CASE)
# One vocabulary entry: rewards and the q_hidden gradient are 0 in the reference, roundoff here.
@example(seq=2, hidden=1, vocab=1, alpha_tilde=1.0, pairs=1, chunk=1, alpha_0=1.0, gamma=1.0, beta=0.0,
         value_at="current", reward_norm="padded", seed=0)
@example(seq=2, hidden=1, vocab=1, alpha_tilde=1.0, pairs=1, chunk=1, alpha_0=0.0, gamma=0.9999999999999999,
         beta=0.0, value_at="current", reward_norm="padded", seed=2)
def test_property_float64_backends_match_reference(name, pairs, seq, hidden, vocab, chunk, seed, **hyper):
    """Random shapes, masks and options in float64; the examples are fixed (derandomize), so CI runs
    the same ones each time."""
    x = make_inputs(batch=2 * pairs, seq=seq, hidden=hidden, vocab=vocab, dtype=torch.float64, seed=seed,
                    prompt_only_row=False)
    x["labels"][0, -1] = 0  # at least one scored token
    assert_agree(name, x, 1e-9, atol=1e-13, chunk_size=chunk, **hyper)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(seq=st.integers(2, 9), hidden=st.integers(1, 20), vocab=st.integers(1, 300),
       alpha_tilde=st.floats(0.1, 3.0), **RANDOM_CASE)
def test_property_every_backend_matches_reference_in_float32(name, pairs, seq, hidden, vocab, chunk, seed, **hyper):
    """Random shapes (vocabularies and hidden sizes off every tile size), masks and options.

    The margin, a difference of nearly equal rewards in some draws (-0.0069 from rewards near -9),
    is checked against the rewards' scale: relative to itself, float32 rounding of the rewards
    alone exceeds 1e-4. The examples are fixed (derandomize), so CI runs the same ones each time.
    """
    backend(name)
    x = make_inputs(batch=2 * pairs, seq=seq, hidden=hidden, vocab=vocab, seed=seed, prompt_only_row=False,
                    device=DEVICE)
    x["labels"][0, -1] = 0  # at least one scored token
    got, ref = assert_agree(name, x, 2e-5, fields=FIELDS[:-1], chunk_size=chunk, **hyper)
    scale = torch.cat([ref.chosen_rewards, ref.rejected_rewards]).abs().mean().clamp(min=1e-30)
    assert float((got.margin - ref.margin).abs() / scale) <= 2e-5


def nonfinite_kind(t: torch.Tensor) -> str:
    """What a tensor holds, worst first: NaN, +inf, -inf, or only finite values."""
    t = t.detach()
    if t.isnan().any():
        return "nan"
    if t.isposinf().any():
        return "+inf"
    return "-inf" if t.isneginf().any() else "finite"


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(site=st.sampled_from(["base_hidden", "q_hidden", "weight", "q_weight", "q_bias"]),
       value=st.sampled_from([float("inf"), float("-inf"), float("nan")]),
       vocab=st.integers(2, 60), pick=st.integers(0, 2**16), **RANDOM_CASE)
def test_property_nonfinite_inputs_give_the_references_nonfinite_outputs(name, site, value, vocab, pick, pairs,
                                                                         chunk, seed, **hyper):
    """One inf, -inf or NaN in a hidden state at a scored position, or anywhere in a head: the loss
    and each gradient are NaN, +inf, -inf or finite exactly as in the reference."""
    backend(name)
    x = make_inputs(batch=2 * pairs, seq=6, hidden=5, vocab=vocab, seed=seed, prompt_only_row=False,
                    q_head=True, q_bias=True, device=DEVICE)
    x["labels"][0, -1] = 0  # at least one scored token
    with torch.no_grad():
        if site.endswith("hidden"):
            rows, cols = (x["labels"][:, 1:] != -100).nonzero(as_tuple=True)
            at = pick % rows.numel()
            x[site][rows[at], cols[at], pick % 5] = value
        else:
            x[site].view(-1)[pick % x[site].numel()] = value
    ref, ref_grads = loss_and_grads(x, backend="reference", chunk_size=chunk, **hyper)
    got, got_grads = loss_and_grads(x, backend=name, chunk_size=chunk, **hyper)
    assert nonfinite_kind(got.loss) == nonfinite_kind(ref.loss)
    for key, grad in ref_grads.items():
        assert nonfinite_kind(got_grads[key]) == nonfinite_kind(grad), key


@pytest.mark.parametrize("name", ["reference", *NAMES])
def test_a_shares_terms_are_the_batchs_own_means(name):
    """With totals, ``bt_loss`` and ``chi2_loss`` stay this batch's own means and the loss is
    ``(K/K_tot) bt + beta (sum r^2) / n_tot`` (docs/design.md, "The loss")."""
    backend(name)
    x = make_inputs(batch=4, seq=9, seed=13, device=DEVICE)
    options = dict(backend=name, reward_norm="sum", beta=0.3, chunk_size=5)
    own = qadapter_loss(**x, **options)
    n = int((x["labels"][:, 1:] != -100).sum())
    share = qadapter_loss(**x, **options, total_pairs=5, total_tokens=3 * n)
    assert rel_err(share.bt_loss, own.bt_loss) <= TOL[torch.float32]
    assert rel_err(share.chi2_loss, own.chi2_loss) <= TOL[torch.float32]
    assert rel_err(share.loss, 2 / 5 * own.bt_loss + own.chi2_loss / 3) <= TOL[torch.float32]


@pytest.mark.parametrize("runnable", [("chunked-triton", "cuda"), ("cuda",), ()])
def test_auto_takes_the_first_backend_that_runs(monkeypatch, runnable):
    """``auto`` on CUDA takes the first of chunked-triton, cuda, chunked that runs here (float64: that
    also takes float64), never one whose status says it cannot run; elsewhere chunked. The statuses
    are set here, so the rule is checked whatever this machine has."""
    monkeypatch.setattr(registry, "status",
                        lambda name: registry.BackendStatus(name, name in (*runnable, "reference", "chunked")))
    cuda = torch.device("cuda")
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        order = [n for n in ("chunked-triton", "cuda") if n in runnable and (dtype != torch.float64 or n == "cuda")]
        assert registry.resolve("auto", cuda, dtype).name == (order + ["chunked"])[0], dtype
        assert registry.resolve("auto", torch.device("cpu"), dtype).name == "chunked"


def test_a_backend_whose_module_cannot_be_imported_is_reported_not_raised(monkeypatch):
    """A backend whose module fails to import (a missing optional dependency) is unavailable with the
    import error as its reason: ``backends()`` reports it, ``auto`` passes it by, naming it raises why."""
    real_get = registry.get

    def get(name):
        if name == "chunked-triton":
            raise ImportError("No module named 'triton'")
        return real_get(name)

    monkeypatch.setattr(registry, "get", get)
    report = registry.backends()
    assert report["chunked-triton"] == registry.BackendStatus(
        "chunked-triton", False, "cannot import it: No module named 'triton'")
    assert report["chunked"].available and report["reference"].available
    assert registry.resolve("auto", torch.device("cuda"), torch.float32).name in ("cuda", "chunked")
    with pytest.raises(RuntimeError, match=r"backend 'chunked-triton' is not available: cannot import it: No module"):
        registry.resolve("chunked-triton", torch.device("cpu"), torch.float32)
