"""Decode cost of the customized policy beside the base model alone, through the same path, in one run.

Every row is transformers' ``generate`` (greedy, a fixed number of new tokens), eager (dynamic
cache) and compiled (static cache, compiled step: :func:`qadapter.library.policy.decoding_config`):

- ``base``: the frozen model alone, as a user runs it (a plain transformers model, no adapter layers);
- ``base x2``: the same on twice the rows: the floor of any method that runs the frozen and the
  adapter model in one forward of a doubled batch;
- ``policy``: ``QAdapterModel.generate``, the customized policy (a trained-looking adapter).

ms/token is the decode step alone: the time between the first and the last new token (a streamer
clocks them), over the tokens in between, so the prefill is left out. Rounds are interleaved
(median). Embedded default on the CPU; ``python -m bench.decode [--tokens 32] [--rounds 3]
[--batches 1 8] [--threads N]``; writes ``bench/results/decode-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Callable

import torch

from bench.common import cpu_bench_args, sync, versions, write_result

MODES = ("eager", "compiled")


class TokenClock:
    """A streamer that notes when each new token arrives (transformers calls ``put`` with the prompt first)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self.prompt_seen = device, [], False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def ms_per_token(self) -> float:
        if len(self.times) < 2:
            raise ValueError("ms_per_token needs at least two new tokens")
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1) * 1e3


def generation(generate: Callable, ids: torch.Tensor, tokens: int, compiled: bool) -> Callable[[], float]:
    """One timed generation of exactly ``tokens`` greedy tokens; returns its decode ms/token."""
    from qadapter.library.policy import decoding_config
    from transformers import GenerationConfig

    config = decoding_config(GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                              eos_token_id=[], pad_token_id=0), compiled)

    def run() -> float:
        clock = TokenClock(ids.device)
        generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=clock)
        return clock.ms_per_token()
    return run


def frozen_generate(model) -> Callable:
    """transformers' ``generate`` of a QAdapterModel's base with its adapter disabled: the base alone
    without a second copy of its weights (what a GPU under a memory cap can hold)."""
    @torch.no_grad()
    def generate(*args, **kwargs):
        with model.peft_model.disable_adapter():
            return model.base_model.generate(*args, **kwargs)
    return generate


def interleaved(loops: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each loop's results over ``rounds`` after one warm-up call each (it compiles); within a
    round they take turns, so that a drift in a shared machine's load biases none."""
    for fn in loops.values():
        fn()
    runs = {name: [] for name in loops}
    for _ in range(rounds):
        for name, fn in loops.items():
            runs[name].append(fn())
    return runs


def decode_rows(model, plain_base, ids: torch.Tensor, tokens: int, rounds: int, modes=MODES) -> dict:
    """ms/token of the base (``plain_base``: a model without adapter layers), the base on twice the
    rows, and the policy of ``model`` (a QAdapterModel), in each of ``modes``, interleaved rounds."""
    loops = {}
    for mode in modes:
        compiled = mode == "compiled"
        loops[f"base {mode}"] = generation(plain_base.generate, ids, tokens, compiled)
        loops[f"base x2 {mode}"] = generation(plain_base.generate, ids.repeat(2, 1), tokens, compiled)
        loops[f"policy {mode}"] = generation(model.generate, ids, tokens, compiled)
    runs = interleaved(loops, rounds)
    ms = {name: statistics.median(v) for name, v in runs.items()}
    row = {"ms_per_token": ms, "all_ms_per_token": runs,
           "tokens_per_s": {name: ids.shape[0] * 1e3 / v for name, v in ms.items()}}
    for mode in modes:
        row[f"policy_over_base_{mode}"] = ms[f"policy {mode}"] / ms[f"base {mode}"]
        row[f"policy_over_base_x2_{mode}"] = ms[f"policy {mode}"] / ms[f"base x2 {mode}"]
    if set(modes) == set(MODES):
        row["compiled_over_eager_policy"] = ms["policy compiled"] / ms["policy eager"]
    return row


def trained_looking(model, seed: int = 0) -> None:
    """LoRA B drawn at random (it starts at zero), so the adapter changes the policy as a trained one does."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g).to(param) * 0.02)


def measure(tokens: int = 32, rounds: int = 3, batches: tuple[int, ...] = (1, 8)) -> dict:
    from qadapter.library.defaults import DEFAULT_MODEL, load_base
    from qadapter.library.model import QAdapterModel

    model = QAdapterModel.from_base()
    model.eval()
    trained_looking(model)
    plain_base = load_base(DEFAULT_MODEL)[0].eval()
    tok = model.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    return {
        "device": "cpu", "threads": torch.get_num_threads(), **versions("cpu", ("transformers", "peft")), "tokens": tokens, "rounds": rounds,
        "prompt_tokens": ids.shape[1],
        "batches": {str(b): decode_rows(model, plain_base, ids.repeat(b, 1), tokens, rounds) for b in batches},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = cpu_bench_args(parser, argv)
    result = measure(args.tokens, args.rounds, tuple(args.batches))
    for batch, row in result["batches"].items():
        for name, value in row["ms_per_token"].items():
            print(f"batch {batch} {name:>18}: {value:7.1f} ms/token  {row['tokens_per_s'][name]:7.1f} tokens/s")
        print(f"batch {batch}: policy / base x2 = {row['policy_over_base_x2_eager']:.2f} eager, "
              f"{row['policy_over_base_x2_compiled']:.2f} compiled; compiled / eager policy = "
              f"{row['compiled_over_eager_policy']:.2f}")
    write_result(result, args.out, f"decode-cpu-{datetime.date.today().isoformat()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
