"""Scoring a prompt under a customized policy (the server's echoed prompt, lm-eval's log-likelihoods
through ``qadapter serve``) two ways, in one run: peak extra memory and time.

- ``read_prompts``: :meth:`AdapterSet.read_prompts`, the serving engine's prefill: the decoder's
  hidden states of one forward (whose head forms the last position's logits only) through the
  vocabulary pass, a chunk of positions at a time;
- ``whole logits``: the policy's forward over every position (``QAdapterModel.policy``: the frozen
  and adapter logits ``[2, T, V]``, then the combined log-probs ``[T, V]``), then a gather and a
  top-k: what the engine did before, and what scoring through the model's own logits costs.

Both give every prompt token's log-prob and its ``k`` likeliest alternatives; the run checks they
agree. Peak extra memory as ``bench/memory.py`` counts it (every tensor the call allocates); time:
the calls take turns, median. Embedded default on the CPU, one adapter, prompts of ``--tokens``
tokens; ``python -m bench.echo [--tokens 512 2048] [--rounds 3] [--threads N]``; writes
``bench/results/echo-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import Timer, cpu_bench_args, versions, write_result
from bench.decode import trained_looking
from bench.memory import peak_extra_memory

TOP = 1  # the alternatives lm-eval's local-completions asks for


def scorers(adapter_set, solo, prompt: torch.Tensor, top: int = TOP) -> dict:
    """The two ways of scoring ``prompt [1, T]`` under adapter ``"a"``: each returns the prompt tokens'
    log-probs ``[T - 1]`` and their top-``top`` alternatives' ``[T - 1, top]``."""
    from transformers import DynamicCache

    mask = torch.ones_like(prompt)

    def read_prompts():
        _, (scores,) = adapter_set.read_prompts(prompt, mask, ["a"], DynamicCache(), top=[top])
        return scores.combined, scores.top_logprobs

    def whole_logits():
        logprobs = solo.policy(input_ids=prompt, attention_mask=mask, use_cache=True).logits[0, :-1]
        return logprobs.gather(1, prompt[0, 1:, None])[:, 0], logprobs.topk(top, dim=-1).values

    return {"read_prompts": read_prompts, "whole logits": whole_logits}


def score_rows(adapter_set, solo, vocab: int, tokens: int, rounds: int) -> dict:
    """Peak extra memory, median seconds and agreement of the two ways on one random prompt of ``tokens``."""
    prompt = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.inference_mode():
        ways = scorers(adapter_set, solo, prompt)
        peaks, results = {}, {}
        for name, fn in ways.items():
            results[name], peaks[name] = peak_extra_memory(fn)
        times = Timer("cpu", warmup=0).rounds(ways, rounds)
    (ours, our_top), (theirs, their_top) = results["read_prompts"], results["whole logits"]
    agree = max(float((ours - theirs).abs().max()), float((our_top - their_top).abs().max()))
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {"tokens": tokens, "peak_mib": {name: peak / 2**20 for name, peak in peaks.items()},
            "seconds": seconds, "all_seconds": times, "max_abs_difference": agree,
            "memory_over_whole_logits": peaks["read_prompts"] / peaks["whole logits"],
            "time_over_whole_logits": seconds["read_prompts"] / seconds["whole logits"]}


def measure(tokens: tuple[int, ...] = (512, 2048), rounds: int = 3) -> dict:
    from qadapter.library.adapter_set import AdapterSet
    from qadapter.library.model import QAdapterModel

    model = QAdapterModel.from_base()
    trained_looking(model)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "a")
        del model
        adapter_set = AdapterSet.from_pretrained({"a": Path(tmp) / "a"})
        solo = QAdapterModel.from_pretrained(Path(tmp) / "a")
    adapter_set.peft_model.eval()
    solo.eval()
    vocab = adapter_set.base_model.get_output_embeddings().weight.shape[0]
    return {
        "device": "cpu", "threads": torch.get_num_threads(), **versions("cpu", ("transformers", "peft")),
        "vocab": vocab, "top": TOP, "rounds": rounds,
        "rows": [score_rows(adapter_set, solo, vocab, n, rounds) for n in tokens],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[512, 2048], help="prompt lengths")
    parser.add_argument("--rounds", type=int, default=3)
    args = cpu_bench_args(parser, argv)
    result = measure(tuple(args.tokens), args.rounds)
    for row in result["rows"]:
        print(f"{row['tokens']:>6} tokens: " + "  ".join(
            f"{name} {row['peak_mib'][name]:8.1f} MiB {row['seconds'][name]:6.2f} s" for name in row["seconds"])
            + f"  memory {row['memory_over_whole_logits']:.3f}x, time {row['time_over_whole_logits']:.2f}x, "
              f"max |difference| {row['max_abs_difference']:.1e}")
    write_result(result, args.out, f"echo-cpu-{datetime.date.today().isoformat()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
