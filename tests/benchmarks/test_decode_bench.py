"""The decode benchmark's rows (``bench/decode.py``) on a tiny model: every path generates exactly
the tokens asked for, and the clocked ms/token leaves the prefill out."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from helpers import make_model, tiny_causal_lm  # noqa: E402

from bench.decode import TokenClock, decode_rows, frozen_generate, generation  # noqa: E402


def test_every_row_is_timed_per_decoded_token():
    model = make_model()
    ids = torch.randint(3, 97, (2, 5), generator=torch.Generator().manual_seed(0))
    row = decode_rows(model, tiny_causal_lm("llama"), ids, tokens=4, rounds=1, modes=("eager",))
    assert set(row["ms_per_token"]) == {"base eager", "base x2 eager", "policy eager"}
    assert all(v > 0 for v in row["ms_per_token"].values())
    assert row["tokens_per_s"]["policy eager"] == pytest.approx(2e3 / row["ms_per_token"]["policy eager"])


def test_generation_makes_exactly_the_tokens_asked_for():
    model = make_model()
    ids = torch.randint(3, 97, (1, 5), generator=torch.Generator().manual_seed(0))
    produced = []

    def recording(generate):
        def run(*args, **kwargs):
            out = generate(*args, **kwargs)
            produced.append(out.shape[1] - ids.shape[1])
            return out
        return run

    for generate in (model.generate, frozen_generate(model)):
        assert generation(recording(generate), ids, tokens=6, compiled=False)() > 0
    assert produced == [6, 6]


def test_token_clock_skips_the_prompt():
    clock = TokenClock(torch.device("cpu"))
    clock.put(torch.zeros(1, 9))  # the prompt
    clock.times = [1.0, 1.5, 2.0]
    assert clock.ms_per_token() == pytest.approx(500.0)
    with pytest.raises(ValueError, match="two new tokens"):
        TokenClock(torch.device("cpu")).ms_per_token()
