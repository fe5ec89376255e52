"""Does a 4-bit base cost the customization anything? The built-in task trained on a dense and on a
4-bit base (NF4, double quantization), the same steps, seed and options, side by side.

Each run is the main job (:func:`qadapter.experiments.demo.run_demo`, what ``qadapter demo`` and
``qadapter demo --load-in-4bit`` run): the embedded default trained on the built-in TL;DR task, then
held-out preference accuracy under the learned rewards (and the step-0 adapter's), rule
satisfaction, knowledge-probe accuracy and KL to the base, and the base's own rule satisfaction and
probe accuracy before training (the probe holds questions the dense base answers right; the 4-bit
base answers fewer). The target: the 4-bit run's held-out accuracy within 0.05 of the dense run's. The runs go one after the other in one process, so no
peak memory is reported (the process's peak resident memory would carry the first run's into
the second's).

    python -m bench.quantized_accuracy                      # 40 steps, seed 0: both runs, ~10 min on 2 cores
    python -m bench.quantized_accuracy --steps 20 --seed 1  # any demo option (python -m bench.quantized_accuracy --help)

Writes ``quantized-accuracy-<device>-<date>.json`` into ``--out`` (default ``bench/results``), the
two runs' adapters and reports into ``--output``'s ``dense/`` and ``nf4/``.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.common import bench_device, device_label, options_main, versions

RUNS = {"dense": None, "nf4": {"method": "nf4", "double_quant": True}}  # the compute dtype: the device's default
TARGET = 0.05  # the largest held-out accuracy difference the target allows
KEPT = ("quantization", "train_seconds", "steps_per_second", "load_seconds", "total_seconds")
MEASURES = ("heldout_accuracy", "heldout_margin", "rule_rate", "probe_accuracy", "kl_to_base")
PER_RUN = ("output", "quantization")  # options each run sets itself


def run(options) -> dict:
    """Both runs of :data:`RUNS` with ``options`` (a ``DemoOptions``); the result record."""
    from qadapter.experiments.demo import run_demo

    started = time.monotonic()
    device = bench_device()
    result = {"device": device_label(device), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "versions": versions(device, ("transformers", "peft", "bitsandbytes")),
              "threads": torch.get_num_threads(), "runs": {},
              "options": {k: v for k, v in asdict(options).items() if k not in PER_RUN}}
    for name, quantization in RUNS.items():
        report = run_demo(replace(options, output=str(Path(options.output) / name), quantization=quantization))
        before, after = report["before"], report["after"]
        result["runs"][name] = {**{key: report[key] for key in KEPT},
                                **{key: after[key] for key in MEASURES},
                                # The base's own (for nf4: the 4-bit base's) before training.
                                "step0_heldout_accuracy": before["heldout_accuracy"],
                                "base_rule_rate": before["rule_rate"], "base_probe_accuracy": before["probe_accuracy"],
                                "heldout_pairs": report["heldout_pairs"], "train_pairs": report["train_pairs"]}
    dense, nf4 = result["runs"]["dense"]["heldout_accuracy"], result["runs"]["nf4"]["heldout_accuracy"]
    result |= {"difference": nf4 - dense, "target": TARGET, "within_target": abs(nf4 - dense) <= TARGET + 1e-9,
               "wall_seconds": time.monotonic() - started}
    return result


def summary(result: dict) -> str:
    """One line per run and the difference, as the README quotes them."""
    lines = []
    for name, row in result["runs"].items():
        lines.append(f"{name:>5}: held-out accuracy {row['heldout_accuracy']:.3f} (step 0: "
                     f"{row['step0_heldout_accuracy']:.3f}), rule {row['rule_rate']:.3f}, probe "
                     f"{row['probe_accuracy']:.3f} (base: {row['base_probe_accuracy']:.3f}), KL {row['kl_to_base']:.3f}; "
                     f"{row['train_seconds']:.0f} s training")
    lines.append(f"difference (nf4 - dense): {result['difference']:+.3f} "
                 f"({'within' if result['within_target'] else 'OUTSIDE'} the target of {result['target']}); "
                 f"{result['options']['max_steps']} steps, seed {result['options']['seed']}, "
                 f"{result['wall_seconds'] / 60:.1f} min")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from qadapter.experiments.options import DemoOptions

    return options_main(argv, prog="python -m bench.quantized_accuracy", doc=__doc__, options_class=DemoOptions,
                        run=run, summary=summary, name="quantized-accuracy", output="qadapter-demo/quantized-accuracy")


if __name__ == "__main__":
    raise SystemExit(main())
