"""``qadapter serve`` throughput: concurrent requests over several adapters beside the same requests
one at a time, through ``qadapter serve`` in a process of its own on the loopback address, in one run.

Each round sends the same ``requests`` chat completions (greedy, ``max_tokens`` each, request ``i``
to adapter ``i mod adapters``) twice: one after another, then all at once; tokens/s is the completion
tokens over the wall time of the whole set. Rounds take turns (median). Embedded default on the CPU;
``python -m bench.serve [--requests 8] [--adapters 4] [--max-tokens 64] [--rounds 3] [--threads N]``
(``--threads``: the server's torch threads);
writes ``bench/results/serve-<device>-<date>-<max tokens>-tokens.json``. Each request's prefill is
the same work either way, so the shorter the answers, the more of the time it takes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.adapter_set import save_adapters
from bench.common import cpu_bench_args, versions, write_result

PROMPTS = ["Tell me a long story about a dragon.", "Explain how rain forms.", "Write a poem about the sea.",
           "What should I cook tonight?", "Describe the city of Paris.", "How do bees make honey?",
           "Give me advice for a job interview.", "Why is the sky blue?"]


@contextlib.contextmanager
def serving(adapters: dict[str, Path], max_batch: int, threads: int | None = None, base_model: str | None = None):
    """``qadapter serve`` over ``adapters`` in a process of its own (as a deployment runs it: the
    clients do not share its interpreter), on a free loopback port; yields its base URL, and ends it
    with Ctrl-C."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # No prefix cache: the concurrent pass would find the prompts the one-at-a-time pass stored
    # (bench.prefix_cache measures the cache).
    command = [sys.executable, "-m", "qadapter", "serve", "--port", str(port), "--max-batch", str(max_batch),
               "--prefix-cache", "0", "--log-level", "warning",
               *(f"--adapter={name}={path}" for name, path in adapters.items())]
    if base_model is not None:
        command += ["--base-model", base_model]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qadapter serve did not come up: {process.stderr.read()[-2000:]}")
            time.sleep(0.2)
        yield base_url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def completion_tokens(base_url: str, body: dict) -> int:
    import httpx

    response = httpx.post(f"{base_url}/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def throughput(base_url: str, bodies: list[dict], concurrent: bool) -> float:
    """Completion tokens per second of ``bodies``, sent all at once or one after another."""
    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(len(bodies)) as pool:
            tokens = sum(pool.map(lambda body: completion_tokens(base_url, body), bodies))
    else:
        tokens = sum(completion_tokens(base_url, body) for body in bodies)
    return tokens / (time.perf_counter() - start)


class TokenIdText:
    """A tokenizer stand-in for a model that has none (a random GPU-sized architecture): token ids as
    text, so the engine's streaming and stop handling run unchanged."""

    pad_token_id = 0

    def __init__(self, eos_token_id: int | None) -> None:
        self.eos_token_id = eos_token_id

    def decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, tokens))


def engine_throughput(engine, prompts: list[list[int]], adapters: list[str], max_tokens: int,
                      concurrent: bool) -> float:
    """Completion tokens per second of the engine alone (no HTTP) on ``prompts``, each to its adapter,
    submitted all at once or one after another."""
    from qadapter.serving.engine import Request

    ends = []

    def submit(prompt, adapter):
        engine.submit(Request(prompt=prompt, adapter=adapter, max_tokens=max_tokens,
                              emit=lambda event: ends.append(event) if "finish_reason" in event else None))

    start = time.perf_counter()
    for prompt, adapter in zip(prompts, adapters):
        submit(prompt, adapter)
        if not concurrent and not engine.wait_idle(600):
            raise RuntimeError("the engine did not finish a request in 600 s")
    if not engine.wait_idle(600):
        raise RuntimeError("the engine did not finish its requests in 600 s")
    return sum(e["completion_tokens"] for e in ends) / (time.perf_counter() - start)


def serve_rows(base_url: str, names: list[str], requests: int, max_tokens: int, rounds: int) -> dict:
    bodies = [{"model": names[i % len(names)], "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
               "max_tokens": max_tokens, "temperature": 0} for i in range(requests)]
    throughput(base_url, bodies[:2], concurrent=True)  # warm-up
    runs = {"one at a time": [], f"{requests} concurrent": []}
    for _ in range(rounds):
        runs["one at a time"].append(throughput(base_url, bodies, concurrent=False))
        runs[f"{requests} concurrent"].append(throughput(base_url, bodies, concurrent=True))
    tps = {name: statistics.median(v) for name, v in runs.items()}
    return {"tokens_per_s": tps, "all_tokens_per_s": runs,
            "concurrent_over_one_at_a_time": tps[f"{requests} concurrent"] / tps["one at a time"]}


def measure(requests: int = 8, adapters: int = 4, max_tokens: int = 64, rounds: int = 3) -> dict:
    from qadapter.library.model import QAdapterModel

    model = QAdapterModel.from_base()
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_adapters(model, Path(tmp), adapters)
        del model
        with serving(paths, max_batch=requests, threads=torch.get_num_threads()) as base_url:
            rows = serve_rows(base_url, list(paths), requests, max_tokens, rounds)
    return {"device": "cpu", "threads": torch.get_num_threads(), **versions("cpu", ("transformers", "peft")),
            "requests": requests, "adapters": adapters, "max_tokens": max_tokens, "rounds": rounds, **rows,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = cpu_bench_args(parser, argv)
    result = measure(args.requests, args.adapters, args.max_tokens, args.rounds)
    for name, value in result["tokens_per_s"].items():
        print(f"{name:>14}: {value:7.1f} tokens/s")
    print(f"concurrent / one at a time = {result['concurrent_over_one_at_a_time']:.2f}")
    write_result(result, args.out, f"serve-cpu-{datetime.date.today().isoformat()}-{args.max_tokens}-tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
