"""A training step on preference batches padded, and packed without padding with each shared prefix
once (``QAdapterModel(padding_free=True)``, :mod:`qadapter.library.packing`), in one run: tokens
through the model, attention's score work, step time, peak extra memory, and how far the loss and
the LoRA gradient move; and the packed layout alone over more batch shapes (:func:`layouts`). Where
the packed rows' length chosen by cost differs from rows as long as the largest tree (the rule
before it, :func:`largest_tree_rows`), that layout is timed too, and laid out in the sweep beside it.

The step is the trainer's: the Q-Adapter loss of a batch (frozen and adapter passes, the fused loss)
and its backward. Batches are the HH-RLHF harmless pairs of ``bench.common.HH_DATA`` (multi-turn prompts,
responses of every length: a real preference batch's padding and shared prompts), tokenized as
``qadapter train`` does, shuffled with a fixed seed; where that file is absent, the built-in task's
pairs (``source`` in the result says which). The two ways take turns, median; embedded default on the
CPU; the adapter's LoRA B drawn so that the gradient is a trained adapter's, not zero's.

    python -m bench.padding_free [--pairs 4] [--max-length 512] [--batches 3] [--rounds 3] [--threads N]

writes ``bench/results/padding-free-<device>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import random
import statistics
from contextlib import contextmanager, nullcontext
from unittest import mock

import torch

from bench.common import HH_DATA, Timer, cpu_bench_args, versions, write_result
from bench.decode import trained_looking
from bench.memory import peak_extra_memory


def preference_features(tokenizer, max_length: int) -> tuple[list[dict], str]:
    """Tokenized pairs of the shared HH-RLHF file, or of the built-in task where it is absent."""
    from qadapter.library.data import load_preference_data, tokenize_rows

    if HH_DATA.is_file():
        data, _ = load_preference_data(str(HH_DATA), tokenizer, max_length=max_length,
                                       max_prompt_length=max_length // 2, skip_invalid=True)
        return list(data), HH_DATA.name
    from qadapter.experiments.task import load_task

    features, _ = tokenize_rows(load_task()["train"], tokenizer, max_length=max_length,
                                max_prompt_length=max_length // 2)
    return features, "built-in task"


def step_of(model, batch: dict):
    """One training step's loss and backward; returns the loss and the LoRA gradient, flat."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in params])

    return step


@contextmanager
def largest_tree_rows():
    """Within it, packed rows are as long as the largest tree (or sequence): the baseline of the row
    length :func:`qadapter.library.packing.pack_batch` chooses by cost."""
    from qadapter.library import packing

    with mock.patch.object(packing, "row_capacity", lambda sizes, hidden_size, most, **bound: max(sizes)):
        yield


def _packed_ids(pack, batch: dict, baseline: bool = False) -> torch.Tensor | None:
    with largest_tree_rows() if baseline else nullcontext():
        packed = pack(batch["input_ids"], batch["attention_mask"])
    return None if packed is None else packed.inputs["input_ids"]


def measure_batch(model, batch: dict, rounds: int) -> dict:
    """Tokens, peak extra memory, median step seconds of both ways on ``batch``, and their agreement;
    the packed step with rows as long as the largest tree too, where that layout differs."""
    from qadapter.library.packing import model_packing

    pack = model_packing(model.base_model)
    packed = pack(batch["input_ids"], batch["attention_mask"])
    baseline = _packed_ids(pack, batch, baseline=True)
    ways = {}
    for name, flag in (("padded", False), ("padding_free", True)):
        def run(flag=flag):
            model.padding_free = flag
            return step_of(model, batch)()
        ways[name] = run
    differs = packed is not None and baseline is not None and baseline.shape != packed.inputs["input_ids"].shape
    if differs:
        def run_baseline():
            model.padding_free = True
            with largest_tree_rows():
                return step_of(model, batch)()
        ways["largest_tree_rows"] = run_baseline
    results, peaks = {}, {}
    for name, fn in ways.items():
        results[name], peaks[name] = peak_extra_memory(fn)
    times = Timer("cpu", warmup=0).rounds(ways, rounds)
    (loss, grad), (packed_loss, packed_grad) = results["padded"], results["padding_free"]
    seconds = {name: statistics.median(values) for name, values in times.items()}
    return {
        "sequences": int(batch["input_ids"].shape[0]), "padded_tokens": int(batch["input_ids"].numel()),
        "attended_tokens": int(batch["attention_mask"].sum()),
        "packed_tokens": int(batch["input_ids"].numel()) if packed is None else packed.tokens,
        # Attention's score work (rows x width^2): what a dense mask costs, hidden or not.
        "attention_over_padded": 1.0 if packed is None else _attention_work(packed.inputs["input_ids"])
        / _attention_work(batch["input_ids"]),
        "seconds": seconds, "all_seconds": times, "peak_mib": {k: v / 2**20 for k, v in peaks.items()},
        "time_over_padded": seconds["padding_free"] / seconds["padded"],
        "largest_tree_rows_tokens": int(baseline.numel()) if differs else None,
        "time_over_largest_tree_rows": seconds["padding_free"] / seconds["largest_tree_rows"] if differs else None,
        "memory_over_padded": peaks["padding_free"] / peaks["padded"],
        "loss_difference": float((loss - packed_loss).abs()),
        "gradient_relative_difference": float((grad - packed_grad).norm() / grad.norm()),
    }


def _attention_work(ids: torch.Tensor) -> int:
    return ids.shape[0] * ids.shape[1] ** 2


def layouts(tokenizer, pack, pairs_options=(4, 8, 16), lengths=(512, 1024), batches: int = 10) -> list[dict]:
    """The packed layout alone (no model runs) over more batch shapes than are timed: packed tokens,
    rows and attention's score work against the padded batch's, each the mean over ``batches``, and
    the tokens and attention work of rows as long as the largest tree (:func:`largest_tree_rows`)."""
    from qadapter.library.data import PreferenceCollator

    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    out = []
    for max_length in lengths:
        features, _ = preference_features(tokenizer, max_length)
        random.Random(0).shuffle(features)
        for pairs in pairs_options:
            shares = []
            for k in range(min(batches, len(features) // pairs)):
                batch = collate(features[k * pairs : (k + 1) * pairs])
                padded = batch["input_ids"]
                packed, baseline = (_packed_ids(pack, batch, rule) for rule in (False, True))
                packed, baseline = (padded if ids is None else ids for ids in (packed, baseline))
                shares.append((packed.numel() / padded.numel(), packed.shape[0],
                               _attention_work(packed) / _attention_work(padded),
                               baseline.numel() / padded.numel(), _attention_work(baseline) / _attention_work(padded)))
            tokens, rows, attention, baseline_tokens, baseline_attention = (statistics.mean(c) for c in zip(*shares))
            out.append({"max_length": max_length, "pairs": pairs, "batches": len(shares),
                        "packed_tokens_over_padded": tokens, "packed_rows": rows, "attention_over_padded": attention,
                        "largest_tree_rows": {"tokens_over_padded": baseline_tokens,
                                              "attention_over_padded": baseline_attention}})
    return out


def _ratio(rows: list[dict], way: str, baseline: str) -> float | None:
    """Summed seconds of ``way`` over ``baseline``'s on ``rows``; None without rows."""
    if not rows:
        return None
    return sum(r["seconds"][way] for r in rows) / sum(r["seconds"][baseline] for r in rows)


def measure(pairs: int = 4, max_length: int = 512, batches: int = 3, rounds: int = 3) -> dict:
    from qadapter.library.data import PreferenceCollator
    from qadapter.library.model import QAdapterModel
    from qadapter.library.packing import model_packing

    model = QAdapterModel.from_base(lora_dropout=0.0)
    trained_looking(model)
    features, source = preference_features(model.tokenizer, max_length)
    random.Random(0).shuffle(features)
    collate = PreferenceCollator(pad_token_id=model.tokenizer.pad_token_id)
    rows = [measure_batch(model, collate(features[k * pairs : (k + 1) * pairs]), rounds) for k in range(batches)]
    layout = layouts(model.tokenizer, model_packing(model.base_model))
    return {
        "device": "cpu", "threads": torch.get_num_threads(), **versions("cpu", ("transformers", "peft")),
        "source": source, "pairs": pairs, "max_length": max_length, "rounds": rounds,
        "attention": model.base_model.config._attn_implementation, "rows": rows, "layouts": layout,
        "time_over_padded": _ratio(rows, "padding_free", "padded"),
        # Over the batches whose rows by cost differ from rows as long as the largest tree (None if none).
        "time_over_largest_tree_rows": _ratio([r for r in rows if r["time_over_largest_tree_rows"] is not None],
                                              "padding_free", "largest_tree_rows"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.padding_free", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per batch")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence, prompt included")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = cpu_bench_args(parser, argv)
    result = measure(args.pairs, args.max_length, args.batches, args.rounds)
    for row in result["rows"]:
        print(f"{row['padded_tokens']:>6} padded, {row['attended_tokens']:>6} attended, {row['packed_tokens']:>6} packed "
              f"tokens, attention {row['attention_over_padded']:.2f}x: {row['seconds']['padded']:6.2f} s vs {row['seconds']['padding_free']:6.2f} s "
              f"({row['time_over_padded']:.2f}x), memory {row['memory_over_padded']:.2f}x, "
              f"loss |diff| {row['loss_difference']:.1e}, gradient {row['gradient_relative_difference']:.1e}"
              + (f"; {row['time_over_largest_tree_rows']:.2f}x the time of rows as long as the largest tree "
                 f"({row['largest_tree_rows_tokens']} tokens)" if row["time_over_largest_tree_rows"] else ""))
    for row in result["layouts"]:
        print(f"layout of {row['pairs']:>2} pairs at {row['max_length']:>4}: {row['packed_tokens_over_padded']:.2f}x the "
              f"padded tokens in {row['packed_rows']:.1f} rows, attention {row['attention_over_padded']:.2f}x "
              f"(rows as long as the largest tree: {row['largest_tree_rows']['tokens_over_padded']:.2f}x, "
              f"{row['largest_tree_rows']['attention_over_padded']:.2f}x)")
    print(f"all batches: {result['time_over_padded']:.2f}x the padded step's time ({result['source']})")
    if result["time_over_largest_tree_rows"] is not None:
        print(f"batches whose rows by cost differ: {result['time_over_largest_tree_rows']:.2f}x the time of rows as "
              "long as the largest tree")
    write_result(result, args.out, f"padding-free-cpu-{datetime.date.today().isoformat()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
