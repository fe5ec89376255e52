"""Non-finite inputs give the same kind of answer in every backend that runs here
(docs/design.md, "Numerics and testing", "Non-finite inputs")."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import make_inputs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qadapter_kernels import qadapter_loss, qadapter_token_stats
from qadapter_kernels._cpu import ENV_SWITCH

# (backend, compiled C step on?): the chunked backend with the compiled C step and with the eager one.
BACKENDS = [("reference", True), ("chunked", True), ("chunked", False), ("chunked-triton", True)]
FIELDS = ("base_hidden", "q_hidden", "weight", "q_weight", "q_bias")
TRAINABLE = ("q_hidden", "q_weight", "q_bias")


def kind(t: torch.Tensor) -> str:
    """Per element: f finite, + / - infinite, n NaN."""
    return "".join("n" if x != x else "+" if x == float("inf") else "-" if x == float("-inf") else "f"
                   for x in t.detach().flatten().tolist())


def broken_inputs(field: str, where: str, value: float, positive_head: bool) -> dict:
    x = make_inputs(batch=2, seq=4, hidden=8, vocab=11, q_head=True, q_bias=True, prompt_only_row=False)
    x = {k: (v.detach().clone() if v.is_floating_point() else v) for k, v in x.items()}
    if positive_head:  # every Q logit of a row has the sign of its hidden entries: whole rows go to -inf
        x["q_weight"] = x["q_weight"].abs()
    t = x[field]
    if where == "one":
        t.view(-1)[0] = value
    elif where == "row":
        t[0] = value
    else:
        t.fill_(value)
    for name in TRAINABLE:
        x[name].requires_grad_()
    return x


def outcome(x: dict, backend: str, compiled: bool, monkeypatch) -> tuple:
    monkeypatch.setenv(ENV_SWITCH, "1" if compiled else "0")
    stats = qadapter_token_stats(**x, backend=backend, chunk_size=2)
    out = qadapter_loss(**x, backend=backend, chunk_size=2)
    grads = torch.autograd.grad(out.loss, [x[name] for name in TRAINABLE])
    return (kind(stats.q_taken), kind(stats.value), kind(stats.rewards), kind(out.loss),
            tuple(bool(torch.isfinite(g).all()) for g in grads)), out.loss.detach()


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), where=st.sampled_from(["one", "row", "all"]),
       value=st.sampled_from([float("inf"), float("-inf"), float("nan")]), positive_head=st.booleans())
def test_nonfinite_inputs_agree_across_backends(field, where, value, positive_head, monkeypatch):
    results = []
    for backend, compiled in BACKENDS:
        results.append(outcome(broken_inputs(field, where, value, positive_head), backend, compiled, monkeypatch))
    ref_kinds, ref_loss = results[0]
    for (backend, compiled), (kinds, loss) in zip(BACKENDS, results):
        assert kinds == ref_kinds, (backend, compiled)
        if torch.isfinite(ref_loss):
            torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_nonfinite_entry_gives_the_documented_loss(field, value, monkeypatch):
    """docs/design.md's table, one entry of each input broken, reference and chunked."""
    value = float(value)
    expected = "+" if (field == "q_bias" and value == float("-inf")) else "n"
    for backend, compiled in BACKENDS[:3]:
        x = broken_inputs(field, "one", value, False)
        if field == "q_bias":  # entry 0 of the bias: make it a scored target so -inf is taken
            x["labels"][0, 1] = 0
        kinds, _ = outcome(x, backend, compiled, monkeypatch)
        assert kinds[3] == expected, (backend, compiled, kinds)


def test_cpu_step_reports_nan_for_an_all_nan_row():
    """The compiled step's maxima skip NaN; a row NaN throughout must still give NaN, not -inf."""
    from qadapter_kernels._cpu import cpu_block_step, cpu_row_step, status

    if not status()[0] or os.environ.get(ENV_SWITCH) == "0":
        pytest.skip("the compiled CPU step is not available")
    z, q = torch.randn(3, 40), torch.randn(3, 40)
    q[1], q[2] = float("nan"), float("-inf")
    _, value, _ = cpu_row_step(z.clone(), q.clone(), torch.zeros(3, dtype=torch.int64), 1.0, 0.01, torch.float32)
    assert kind(value) == "fn-"
    lse_c, lse_z, _ = cpu_block_step(z.clone(), q.clone(), 1.0, 0.01, torch.float32)
    assert kind(lse_c) == "fn-" and kind(lse_z) == "fff"


def test_cpu_step_keeps_a_nan_in_any_block():
    """A NaN in a later vocabulary block whose maximum is below the row's so far (the maxima skip
    NaN, the block's sum is NaN) still makes the row's log-sum-exp NaN, as every other step says."""
    from qadapter_kernels._cpu import cpu_block_step, status

    if not status()[0] or os.environ.get(ENV_SWITCH) == "0":
        pytest.skip("the compiled CPU step is not available")
    z, q = torch.randn(2, 5000), torch.randn(2, 5000)
    q[:, :100] += 20.0  # the first block holds the row's maximum
    q[0, 4000] = float("nan")
    lse_c, _, _ = cpu_block_step(z.clone(), q.clone(), 1.0, 0.01, torch.float32)
    assert kind(lse_c) == "nf"
