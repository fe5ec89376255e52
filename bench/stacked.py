"""Continual customization: a second preference stacked on a first, against one adapter trained on both.

The first preference is the built-in task's (answers open with a ``TL;DR:`` line); the second is a
style the same answers make pairs for (after its opening line the answer goes on as a bulleted list,
:func:`qadapter.experiments.task.bullet_pairs`). The built-in task's pairs are made from the base's
own answers; the second preference's are made from the answers as the first customization writes
them (``--second-from first``: the TL;DR answer, bulleted or not), the way a customized model's own
answers would be collected for its next preference. ``--second-from base`` makes them from the
base's answers instead, which lack the first preference: the loss's chi2 term pulls a policy toward
both responses' tokens, so such pairs teach the first preference away whatever the stack keeps.
Runs, on the embedded default (or ``--model``):

- ``level1``: an adapter on the base, trained on the first preference's pairs;
- ``stacked``: an adapter on ``level1`` (``QAdapterModel(..., on=level1)``, ``q_on="parent"``: its Q
  network the parent's plus the new LoRA), trained on the second preference's pairs only;
- ``stacked-base-q``: the same with ``q_on="base"`` (the new LoRA alone on the base);
- ``joint``: one adapter on the base trained on both pair sets at once, for as many steps as the
  two levels together.

Each is measured against the base as ``qadapter check`` measures an adapter
(:func:`qadapter.evaluation.check.measure`: KL to the base on the held-out pairs, knowledge-probe
log-likelihood accuracy, general-text perplexity), plus both rules' satisfaction in greedy answers to
the held-out prompts and the held-out accuracy of its learned rewards on each preference's pairs.
The question: after the second customization, is the first preference kept and the second learned,
at what cost to knowledge and KL, beside one adapter trained on both?

    python -m bench.stacked                      # the defaults below
    python -m bench.stacked --steps 40 --seed 1  # python -m bench.stacked --help for every option

Writes ``stacked-<device>-<date>.json`` into ``--out`` (default ``bench/results``), the adapters into
``--output``.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from qadapter.experiments.options import option_field

from bench.common import bench_device, device_label, options_main, versions

RULES = ("tldr", "bullets")


@dataclass
class StackedOptions:
    """The benchmark's options (its command line is generated from these fields)."""

    model: str | None = option_field(None, "base model: a local directory or a hub name (default: the embedded one)")
    output: str = option_field("qadapter-demo/stacked", "directory for the runs' adapters")
    steps: int = option_field(20, "training steps per preference (the joint adapter takes twice as many)",
                              positive=True)
    pairs_per_step: int = option_field(4, "preference pairs per training step", positive=True)
    learning_rate: float = option_field(4e-3, "peak learning rate (cosine schedule)", positive=True)
    max_length: int = option_field(80, "tokens per sequence, prompt included", positive=True)
    max_prompt_length: int = option_field(48, "prompt tokens kept (cut from the left)", positive=True)
    answer_tokens: int = option_field(64, "tokens generated per held-out answer (both rules must fit)",
                                      positive=True)
    heldout_limit: int | None = option_field(None, "use only the first N held-out pairs of each preference",
                                             positive=True)
    probe_items: int = option_field(48, "knowledge-probe questions, spread over the probe", positive=True)
    passages: int = option_field(2, "general-text passages for perplexity", positive=True)
    seed: int = option_field(0, "seed of the adapters' initialization and of training")
    second_from: str = option_field("first", "the answers the second preference's pairs are made from: as the "
                                    "first customization writes them (first) or as the base does (base)",
                                    choices=("first", "base"))


def rule_rates(model, tokenizer, prompts: list[str], answer_tokens: int, *, customized: bool) -> dict:
    """Fraction of greedy answers to ``prompts`` that follow each rule, and one example."""
    from qadapter.evaluation.measures import answers
    from qadapter.experiments.task import follows_bullets, follows_rule

    texts = answers(model, tokenizer, prompts, customized=customized, max_new_tokens=answer_tokens)
    return {"tldr_rate": sum(map(follows_rule, texts)) / len(texts),
            "bullets_rate": sum(map(follows_bullets, texts)) / len(texts),
            "example": {"prompt": prompts[0], "answer": texts[0]}}


def train(model, features: list[dict], steps: int, options: StackedOptions, work: Path) -> float:
    """Trains ``model`` on tokenized pairs for ``steps`` steps; the training time in seconds."""
    from qadapter.library.trainer import QAdapterConfig, QAdapterTrainer

    args = QAdapterConfig(output_dir=str(work), max_steps=steps, per_device_train_batch_size=options.pairs_per_step,
                          learning_rate=options.learning_rate, lr_scheduler_type="cosine",
                          warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 4), save_strategy="no",
                          report_to=[], seed=options.seed, use_cpu=not torch.cuda.is_available(),
                          dataloader_num_workers=0)
    started = time.perf_counter()
    QAdapterTrainer(model=model, args=args, train_dataset=features, processing_class=model.tokenizer).train()
    return time.perf_counter() - started


def measure(model, suite: dict, options: StackedOptions) -> dict:
    """A trained adapter's row: rule rates, held-out reward accuracy on each preference, and
    :func:`qadapter.evaluation.check.measure`'s KL, probe and perplexity (on the second
    preference's held-out pairs, the same tokens for every run)."""
    from qadapter.evaluation.check import measure as check_measure
    from qadapter.evaluation.measures import preference_metrics

    tokenizer = model.tokenizer
    row = rule_rates(model, tokenizer, suite["prompts"], options.answer_tokens, customized=True)
    checked = check_measure(model, suite["heldout"]["bullets"], probe=suite["probe"], passages=suite["passages"])
    for rule in RULES:
        row[f"{rule}_reward_accuracy"] = preference_metrics(model, suite["heldout"][rule], tokenizer.pad_token_id)["accuracy"]
    row |= {key: checked[key] for key in ("kl_to_base", "probe_accuracy", "base_probe_accuracy", "perplexity",
                                          "base_perplexity")}
    return row


def run(options: StackedOptions) -> dict:
    """Every run of the module's docstring with ``options``; the result record."""
    from qadapter.evaluation.check import subsample
    from qadapter.evaluation.knowledge import general_passages, load_probe
    from qadapter.experiments.task import bullet_pairs, load_task
    from qadapter.library.data import tokenize_rows
    from qadapter.library.model import QAdapterModel

    started = time.monotonic()
    device = bench_device()
    output = Path(options.output)
    task = load_task()
    answers = {"first": "chosen", "base": "rejected"}[options.second_from]  # the task's TL;DR answers, or the base's
    heldout = {"tldr": task["heldout"], "bullets": bullet_pairs(task["heldout"], answers)}
    if options.heldout_limit is not None:
        heldout = {rule: rows[: options.heldout_limit] for rule, rows in heldout.items()}
    train_rows = {"tldr": task["train"], "bullets": bullet_pairs(task["train"], answers)}
    # Both pair sets interleaved, so every stretch of joint training sees both preferences.
    train_rows["joint"] = [row for pair in zip(train_rows["tldr"], train_rows["bullets"]) for row in pair]
    options_record = {k: v for k, v in asdict(options).items() if k != "output"}
    result = {"device": device_label(device), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(device, ("transformers", "peft")),
              "cpu": f"CPU {len(os.sched_getaffinity(0))} cores", "threads": torch.get_num_threads(),
              "options": options_record, "runs": {}}

    def fresh(**stacking):
        torch.manual_seed(options.seed)
        return QAdapterModel.from_base(options.model, **stacking)

    level1 = fresh()
    tokenizer = level1.tokenizer
    # A bulleted answer and the answer as it is differ only after its first sentence: where that lies
    # past max_length the pair is the same tokens twice, and is skipped (counted in the result).
    lengths = dict(max_length=options.max_length, max_prompt_length=options.max_prompt_length, skip_invalid=True)
    read = {name: tokenize_rows(rows, tokenizer, **lengths) for name, rows in train_rows.items()}
    read_heldout = {rule: tokenize_rows(rows, tokenizer, **lengths) for rule, rows in heldout.items()}
    result["data"] = {f"{part}/{name}": str(summary) for part, parts in (("train", read), ("heldout", read_heldout))
                      for name, (_, summary) in parts.items()}
    features = {name: f for name, (f, _) in read.items()}
    suite = {"prompts": [row["prompt"] for row in heldout["tldr"]],
             "heldout": {rule: f for rule, (f, _) in read_heldout.items()},
             "probe": subsample(load_probe(), options.probe_items),
             "passages": general_passages()[: options.passages]}
    result |= {"train_pairs": {name: len(f) for name, f in features.items()},
               "heldout_pairs": {rule: len(f) for rule, f in suite["heldout"].items()}, "probe_items": len(suite["probe"])}
    result["base"] = rule_rates(level1, tokenizer, suite["prompts"], options.answer_tokens, customized=False)

    plan = [("level1", lambda: level1, "tldr", options.steps),
            ("stacked", lambda: fresh(on=output / "level1", q_on="parent"), "bullets", options.steps),
            ("stacked-base-q", lambda: fresh(on=output / "level1", q_on="base"), "bullets", options.steps),
            ("joint", fresh, "joint", 2 * options.steps)]
    for name, build, data, steps in plan:
        model = build()
        seconds = train(model, features[data], steps, options, output / "trainer" / name)
        model.save_pretrained(output / name)
        result["runs"][name] = {"trained_on": data, "steps": steps, "train_seconds": seconds,
                                "stack_depth": len(model.stack), **measure(model, suite, options)}
        print(f"[bench.stacked] {name}: {summary_line(result['runs'][name])}", flush=True)
    result["wall_seconds"] = time.monotonic() - started
    return result


def summary_line(row: dict) -> str:
    return (f"TL;DR {row['tldr_rate']:.2f}, bullets {row['bullets_rate']:.2f}; reward accuracy TL;DR "
            f"{row['tldr_reward_accuracy']:.2f}, bullets {row['bullets_reward_accuracy']:.2f}; probe "
            f"{row['probe_accuracy']:.3f} (base {row['base_probe_accuracy']:.3f}); KL {row['kl_to_base']:.3f}; "
            f"perplexity {row['perplexity']:.2f} (base {row['base_perplexity']:.2f}); {row['train_seconds']:.0f} s")


def summary(result: dict) -> str:
    base = result["base"]
    lines = [f"base: TL;DR {base['tldr_rate']:.2f}, bullets {base['bullets_rate']:.2f}"]
    lines += [f"{name}: {summary_line(row)}" for name, row in result["runs"].items()]
    lines.append(f"{result['options']['steps']} steps per preference, seed {result['options']['seed']}, "
                 f"{result['wall_seconds'] / 60:.1f} min on {result['device']} ({result['cpu']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return options_main(argv, prog="python -m bench.stacked", doc=__doc__, options_class=StackedOptions, run=run,
                        summary=summary, name=lambda result: f"stacked-second-from-{result['options']['second_from']}")


if __name__ == "__main__":
    raise SystemExit(main())
