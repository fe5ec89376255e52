"""The serving engine's prefix cache beside no cache, in one run (the engine alone, no HTTP), greedy:

- ``system prompt``: ``requests`` questions behind one long system prompt, one after another (as
  users arrive), to one adapter;
- ``chat turns``: one conversation of ``turns`` turns, each prompt the last one's conversation, its
  answer and a new question (the chat template renders the answer again: its tokens may differ from
  the ones generated, where reuse then stops).

Each round runs both scenarios on a fresh engine with the cache and on one without, taking turns
(median over rounds): the wall time of the whole scenario, the median time to the first token, and
the prompt tokens read (the rest came from the cache). Embedded default on the CPU; ``python -m
bench.prefix_cache [--requests 8] [--turns 4] [--max-tokens 16] [--rounds 3] [--threads N]``; writes
``bench/results/prefix-cache-cpu-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.adapter_set import save_adapters
from bench.common import cpu_bench_args, versions, write_result
from bench.serve import PROMPTS

SYSTEM = ("You are the support assistant of a small bakery. Answer in a friendly, short way. The bakery opens at "
          "seven in the morning and closes at six in the evening, every day but Monday. It sells bread, "
          "croissants, cakes made to order (two days' notice), coffee and tea. Payment by card or cash. There "
          "is no parking, but the tram stops in front. Gluten-free bread is baked on Thursdays only. Orders "
          "over fifty euros are delivered free within the city. Never promise what is not listed here; when "
          "unsure, ask the customer to call the shop. ") * 2
CACHE_BYTES = 1 << 30  # every scenario's sequences fit


def run(engine, prompts: list[list[int]], adapter: str, max_tokens: int) -> list:
    """Submits ``prompts`` one after another (each after the last one finished); the finished requests."""
    from qadapter.serving.engine import Request

    done = []
    for prompt in prompts:
        request = Request(prompt=prompt, adapter=adapter, max_tokens=max_tokens, emit=lambda event: None)
        engine.submit(request)
        if not engine.wait_idle(600):
            raise RuntimeError("the engine did not finish a request in 600 s")
        done.append(request)
    return done


def chat(engine, tokenizer, adapter: str, turns: int, max_tokens: int, system: str) -> list:
    """One conversation of ``turns`` turns after the ``system`` prompt; the finished requests."""
    messages, done = [{"role": "system", "content": system}], []
    for turn in range(turns):
        messages.append({"role": "user", "content": PROMPTS[turn % len(PROMPTS)]})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        (request,) = run(engine, [list(prompt["input_ids"])], adapter, max_tokens)
        messages.append({"role": "assistant", "content": tokenizer.decode(request.tokens, skip_special_tokens=True)})
        done.append(request)
    return done


def scenario_row(make_engine, scenario) -> dict:
    """One scenario on a fresh engine: wall seconds, median time to the first token, prompt tokens read."""
    engine = make_engine().start()
    try:
        start = time.perf_counter()
        done = scenario(engine)
        wall = time.perf_counter() - start
    finally:
        engine.stop()
    prompt_tokens = sum(len(r.prompt) for r in done)
    return {"seconds": wall, "ttft_ms": statistics.median(1e3 * (r.first_token_at - r.submitted_at) for r in done),
            "prompt_tokens": prompt_tokens,
            "prompt_tokens_read": prompt_tokens - int(engine.metrics.prefix_cache_hits._value.get()),
            "tokens": [r.tokens for r in done]}


def prefix_rows(adapter_set, tokenizer, adapter: str, requests: int, turns: int, max_tokens: int, rounds: int,
                system: str = SYSTEM) -> dict:
    from qadapter.serving.engine import Engine

    asked = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                           add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
             for q in (PROMPTS * requests)[:requests]]
    scenarios = {"system prompt": lambda engine: run(engine, [list(p) for p in asked], adapter, max_tokens),
                 "chat turns": lambda engine: chat(engine, tokenizer, adapter, turns, max_tokens, system)}
    engines = {"no cache": lambda: Engine(adapter_set, tokenizer),
               "prefix cache": lambda: Engine(adapter_set, tokenizer, prefix_cache_bytes=CACHE_BYTES)}
    runs = {scenario: {mode: [] for mode in engines} for scenario in scenarios}
    for steps in scenarios.values():  # warm-up: each side's first run pays for what the process loads
        for make_engine in engines.values():
            scenario_row(make_engine, steps)
    for round_ in range(rounds):
        for scenario, steps in scenarios.items():  # the two sides take turns going first
            for mode, make_engine in list(engines.items())[:: 1 if round_ % 2 == 0 else -1]:
                runs[scenario][mode].append(scenario_row(make_engine, steps))
    rows = {}
    for scenario, modes in runs.items():
        tokens = {mode: [row.pop("tokens") for row in rows_] for mode, rows_ in modes.items()}
        rows[scenario] = {mode: {"seconds": statistics.median(r["seconds"] for r in rows_),
                                 "ttft_ms": statistics.median(r["ttft_ms"] for r in rows_),
                                 "prompt_tokens": rows_[0]["prompt_tokens"],
                                 "prompt_tokens_read": rows_[0]["prompt_tokens_read"], "all": rows_}
                          for mode, rows_ in modes.items()}
        rows[scenario]["same_tokens"] = tokens["no cache"] == tokens["prefix cache"]
        rows[scenario]["seconds_ratio"] = rows[scenario]["prefix cache"]["seconds"] / rows[scenario]["no cache"]["seconds"]
        rows[scenario]["ttft_ratio"] = rows[scenario]["prefix cache"]["ttft_ms"] / rows[scenario]["no cache"]["ttft_ms"]
    return rows


def measure(requests: int = 8, turns: int = 4, max_tokens: int = 16, rounds: int = 3) -> dict:
    from qadapter.library.adapter_set import AdapterSet
    from qadapter.library.model import QAdapterModel

    model = QAdapterModel.from_base()
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(model, Path(tmp), 1)
        del model
        adapter_set = AdapterSet.from_pretrained(paths)
    rows = prefix_rows(adapter_set, adapter_set.tokenizer, next(iter(paths)), requests, turns, max_tokens, rounds)
    return {"device": "cpu", "threads": torch.get_num_threads(), **versions("cpu", ("transformers", "peft")),
            "requests": requests, "turns": turns, "max_tokens": max_tokens, "rounds": rounds, **rows,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_cache", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = cpu_bench_args(parser, argv)
    result = measure(args.requests, args.turns, args.max_tokens, args.rounds)
    for scenario in ("system prompt", "chat turns"):
        row = result[scenario]
        for mode in ("no cache", "prefix cache"):
            r = row[mode]
            print(f"{scenario:>13}, {mode:>12}: {r['seconds']:6.2f} s, first token {r['ttft_ms']:7.1f} ms, "
                  f"prompt tokens read {r['prompt_tokens_read']} of {r['prompt_tokens']}")
        print(f"{scenario:>13}: time x{row['seconds_ratio']:.2f}, first token x{row['ttft_ratio']:.2f}, "
              f"same tokens: {row['same_tokens']}")
    write_result(result, args.out, f"prefix-cache-cpu-{datetime.date.today().isoformat()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
