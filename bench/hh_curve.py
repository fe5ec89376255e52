"""Learning curves on real preference data: HH-RLHF harmless pairs on the embedded default model.

    python -m bench.hh_curve --preset authors --out bench/results/hh-curve-DATE
    python -m bench.hh_curve --preset small --out bench/results/hh-curve-DATE

Splits the HH-RLHF harmless pairs of ``bench.common.HH_DATA`` (the 4 rows with an empty response skipped)
into its last 400 pairs for held-out measurement and the 1,596 before them for training, trains a
Q-Adapter with a preset's options and measures the held-out pairs at step 0 (the base model's own
preference), every ``--every`` steps and at the end (:class:`qadapter.evaluation.curve.LearningCurve`):
accuracy with its 95% interval, margin, loss, KL to the base. Writes ``<preset>-curve.json`` and
``<preset>-curve.png`` into ``--out``. ``--quick`` runs a few steps on a few pairs (CI).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import HH_DATA, versions

HELDOUT_PAIRS = 400

# The authors' loss (LossConfig's defaults) at the budget a first-time user tries, and a preset for
# small models and short budgets: rewards as per-token means (HH responses vary a lot in length),
# a lighter chi2 weight, LoRA on every projection of the attention and the MLP.
PRESETS = {
    "authors": dict(learning_rate=2e-3, reward_norm="padded", beta=0.1, lora_r=8, lora_alpha=16,
                    lora_target_modules=["q_proj", "v_proj"]),
    "small": dict(learning_rate=1e-3, reward_norm="mean", beta=0.01, lora_r=16, lora_alpha=32,
                  lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def split_rows(path: Path = HH_DATA) -> tuple[list[dict], list[dict]]:
    """The usable pairs but the last 400, and the last 400 (a pair with an empty response is not usable)."""
    from qadapter.library.data import PreferenceDataError, check_rows, normalize_row

    usable = []
    for index, row in enumerate(check_rows(path, skip_invalid=True)):
        try:
            normalize_row(index, row)
        except PreferenceDataError:
            continue
        usable.append(row)
    if len(usable) <= HELDOUT_PAIRS:
        raise ValueError(f"{path} has {len(usable)} usable pairs; the split needs more than {HELDOUT_PAIRS}")
    return usable[:-HELDOUT_PAIRS], usable[-HELDOUT_PAIRS:]


def run(preset: str, out: Path, *, steps: int, every: int, heldout: int, batch: int, max_length: int,
        quick: bool = False) -> dict:
    from qadapter.evaluation.curve import LearningCurve
    from qadapter.library.data import load_preference_data
    from qadapter.library.model import QAdapterModel
    from qadapter.library.trainer import QAdapterConfig, QAdapterTrainer

    train_rows, heldout_rows = split_rows()
    if quick:
        train_rows = train_rows[: steps * batch]
    options = PRESETS[preset]
    work = Path(tempfile.mkdtemp(prefix="hh-curve-"))
    try:
        config = QAdapterConfig(output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch,
                                max_length=max_length, max_prompt_length=max_length // 2, logging_steps=every,
                                save_strategy="no", report_to=[], seed=0, **options)
        model = QAdapterModel.from_base(**config.model_options())
        tokenizer = model.tokenizer
        lengths = dict(max_length=max_length, max_prompt_length=max_length // 2, skip_invalid=True)
        train, _ = load_preference_data(train_rows, tokenizer, **lengths)
        held, _ = load_preference_data(heldout_rows[:heldout], tokenizer, split="test", **lengths)
        meta = {"preset": preset, "options": options, "steps": steps, "pairs_per_step": batch,
                "max_length": max_length, "train_pairs": len(train), "data": HH_DATA.name,
                "versions": versions("cpu", packages=("transformers", "peft"))}
        curve = LearningCurve(held.to_list(), tokenizer.pad_token_id, work, every=every, meta=meta)
        started = time.monotonic()
        QAdapterTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer,
                        callbacks=[curve]).train()
        curve.record["wall_seconds"] = round(time.monotonic() - started, 1)
        curve.write()
        out.mkdir(parents=True, exist_ok=True)
        for name in ("curve.json", "curve.png"):
            if (work / name).exists():
                shutil.copyfile(work / name, out / f"{preset}-{name}")
        return curve.record
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--out", type=Path, default=Path("bench/results/hh-curve"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=30, help="optimizer steps between measurements")
    parser.add_argument("--heldout", type=int, default=HELDOUT_PAIRS, help="held-out pairs measured")
    parser.add_argument("--batch", type=int, default=4, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="2 steps, 4 held-out pairs (a smoke test)")
    args = parser.parse_args(argv)
    if not HH_DATA.is_file():
        raise SystemExit(f"{HH_DATA} is not here: the HH-RLHF subset is needed for this benchmark")
    if args.quick:
        args.steps, args.every, args.heldout, args.max_length = 2, 1, 4, 64
    record = run(args.preset, args.out, steps=args.steps, every=args.every, heldout=args.heldout, batch=args.batch,
                 max_length=args.max_length, quick=args.quick)
    print(json.dumps({k: v for k, v in record.items() if k != "versions"}, indent=1))


if __name__ == "__main__":
    main()
