"""``qadapter check``: an adapter measured against its base, and stopped when it forgets.

Preference (did it learn?): accuracy on held-out pairs under the adapter's own rewards, and its
gain over the step-0 baseline (the same rewards with LoRA B = 0), from :func:`evaluate_pairs`.
Retention (did it keep what the base knew?): the mean per-token KL to the base on the same pairs,
the knowledge probe's log-likelihood accuracy (the customized policy against the base), and the
perplexity of general text (against the base's). Each measure is compared with a threshold, and
with an earlier report when one is given (the change since).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from qadapter_kernels.config import check_integer

from ..library.atomic import read_json, recover
from .knowledge import general_passages, load_probe, loglik_accuracy

if TYPE_CHECKING:  # the measuring needs torch; the thresholds and reports (``qadapter check --help``) do not
    from ..library.model import QAdapterModel

REPORT_VERSION = 1


@dataclass
class Thresholds:
    """The limits an adapter must meet; None turns a check off. ``min_*``: the measure must be at
    least the limit; ``max_*``: at most."""

    min_preference_accuracy: float | None = None
    min_preference_gain: float | None = 0.05
    max_kl_to_base: float | None = 0.5
    max_probe_drop: float | None = 0.05
    max_perplexity_ratio: float | None = 1.10

    def __post_init__(self) -> None:
        """Each limit a plain float (numpy's and torch's numbers too, so a report writes it as JSON), or
        None; a string, a bool (a limit of 1 or 0) or NaN is refused naming it, before anything is measured."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            try:
                number = float(value) if not isinstance(value, (bool, str, bytes)) else math.nan
            except (TypeError, ValueError):
                number = math.nan
            if not math.isfinite(number):
                raise ValueError(f"{f.name} must be a finite number or None; got {value!r}")
            setattr(self, f.name, number)

    @classmethod
    def from_file(cls, path: str | Path) -> Thresholds:
        """Thresholds from a JSON object of (some of) the field names; unknown keys are refused."""
        data = read_json(path, "thresholds file")
        if not isinstance(data, dict):
            raise ValueError(f"thresholds file {path} must hold a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"thresholds file {path}: unknown thresholds {unknown}; known: {sorted(names)}")
        for key, value in data.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):  # json reads NaN and Infinity
                raise ValueError(f"thresholds file {path}: {key} must be a finite number or null; got {value!r}")
        return cls(**data)


# measure -> (threshold field, kind); the threshold's prefix says the direction.
CHECKS = {
    "preference_accuracy": ("min_preference_accuracy", "preference"),
    "preference_gain": ("min_preference_gain", "preference"),
    "kl_to_base": ("max_kl_to_base", "retention"),
    "probe_drop": ("max_probe_drop", "retention"),
    "perplexity_ratio": ("max_perplexity_ratio", "retention"),
}


def subsample(items: list, count: int | None) -> list:
    """``count`` items spread evenly over ``items`` (all of them when ``count`` is None or larger)."""
    if count is None or count >= len(items):
        return list(items)
    return [items[(k * len(items)) // count] for k in range(count)]


def check_sample_size(name: str, value: object) -> int | None:
    """``value`` as an int >= 0 (0: skip the measure) or None (all items), or an error naming ``name``:
    a bool would take one item or none, a negative none, unsaid."""
    return None if value is None else check_integer(name, value, least=0, note=" (0: skip) or None (all of them)")


def _policies(model: QAdapterModel):
    """Target log-prob functions of the customized policy and of the base (the adapter disabled)."""
    from .measures import customized_likelihood, likelihood

    plain = likelihood(model.base_model)

    def base(ids, mask, position_ids, targets):
        with model.peft_model.disable_adapter():
            return plain(ids, mask, position_ids, targets)

    return customized_likelihood(model), base


def measure(model: QAdapterModel, features: list[dict], *, probe: list[dict], passages: list[str]) -> dict:
    """Every measure of the check (see the module's docstring), base values included."""
    from .measures import evaluate_pairs, perplexity

    tokenizer = model.tokenizer
    pairs = evaluate_pairs(model, features, tokenizer.pad_token_id, kl=True, step0=True)
    customized, base = _policies(model)
    result = {
        "preference_accuracy": pairs["accuracy"],
        "step0_preference_accuracy": pairs["step0"]["accuracy"],
        "preference_gain": pairs["accuracy"] - pairs["step0"]["accuracy"],
        "preference_margin": pairs["margin"],
        "kl_to_base": pairs["kl_to_base"],
    }
    if probe:
        result["probe_accuracy"] = loglik_accuracy(customized, tokenizer, probe, model.chat_template_kwargs)
        result["base_probe_accuracy"] = loglik_accuracy(base, tokenizer, probe, model.chat_template_kwargs)
        result["probe_drop"] = result["base_probe_accuracy"] - result["probe_accuracy"]
    if passages:
        result["perplexity"] = perplexity(customized, tokenizer, passages)
        result["base_perplexity"] = perplexity(base, tokenizer, passages)
        result["perplexity_ratio"] = result["perplexity"] / result["base_perplexity"]
    return result


def judge(measures: dict, thresholds: Thresholds) -> list[dict]:
    """One entry per threshold that is set and whose measure was taken: value, limit, pass or fail."""
    limits = asdict(thresholds)
    out = []
    for name, (field_name, kind) in CHECKS.items():
        limit = limits[field_name]
        if limit is None or name not in measures:
            continue
        value = measures[name]
        at_least = field_name.startswith("min_")
        passed = value >= limit if at_least else value <= limit
        out.append({"measure": name, "kind": kind, "value": value, "rule": ">=" if at_least else "<=",
                    "limit": limit, "threshold": field_name, "passed": bool(passed)})
    return out


def change_since(measures: dict, baseline: dict) -> dict:
    """Per measure in both reports: the earlier value, this one and the difference."""
    before = baseline.get("measures", {})
    return {name: {"before": before[name], "after": value, "delta": value - before[name]}
            for name, value in measures.items()
            if isinstance(before.get(name), (int, float)) and isinstance(value, (int, float))}


SAMPLE_OPTIONS = {"pairs": "--data or --max-pairs", "probe_items": "--probe-items", "passages": "--passages",
                  "pairs_sha256": "--data, --max-length or --max-prompt-length",
                  "chat_template_kwargs": "the adapters' chat template options: their prompts are rendered otherwise"}


def pairs_digest(features: list[dict]) -> str:
    """sha256 of the measured pairs' tokens and labels: which pairs a report measured, not only how many."""
    digest = hashlib.sha256()
    for feature in features:
        digest.update(json.dumps(feature, sort_keys=True).encode())
    return digest.hexdigest()


def check_same_sample(baseline: dict, sample: dict) -> None:
    """A change since a baseline compares like with like: the same pairs (as many, and the same tokens
    where the baseline recorded them, rendered with the same chat template options), as many probe
    questions and passages (each subsample is the same n items, spread evenly over a fixed order:
    :func:`subsample`); refused otherwise, before measuring."""
    differ = {k: (baseline.get(k), n) for k, n in sample.items() if k in baseline and baseline[k] != n}
    if "pairs" in differ or "chat_template_kwargs" in differ:
        differ.pop("pairs_sha256", None)  # other pairs, or the same rendered otherwise: already said
    if differ:
        def said(k, before, now):
            if k == "pairs_sha256":
                return f"the pairs' tokens differ ({SAMPLE_OPTIONS[k]})"
            return f"{k} {before} there, {now} here ({SAMPLE_OPTIONS[k]})"
        raise ValueError("the baseline report measured another sample, so the change would compare different "
                         "things: " + "; ".join(said(k, *values) for k, values in differ.items())
                         + ". Run with the baseline's data and sizes")


def read_report(path: str | Path) -> dict:
    recover(Path(path).parent, reading=True)  # a report write marked complete there is finished first
    report = read_json(path, "baseline report")
    if not isinstance(report, dict) or not isinstance(report.get("measures"), dict):
        raise ValueError(f"baseline report {path} is not a qadapter check report (no 'measures' object)")
    return report


def run_check(model: QAdapterModel, features: list[dict], thresholds: Thresholds, *, probe_items: int | None = 64,
              passages: int | None = 4, baseline: dict | None = None, meta: dict | None = None) -> dict:
    """The check's report: measures, each threshold's verdict, the failures, and the change since ``baseline``."""
    probe = subsample(load_probe(), check_sample_size("probe_items", probe_items))
    texts = subsample(general_passages(), check_sample_size("passages", passages))
    sample = {"pairs": len(features), "probe_items": len(probe), "passages": len(texts),
              "pairs_sha256": pairs_digest(features), "chat_template_kwargs": model.chat_template_kwargs}
    if baseline is not None:
        check_same_sample(baseline, sample)
    measures = measure(model, features, probe=probe, passages=texts)
    checks = judge(measures, thresholds)
    report = {
        "report_version": REPORT_VERSION, **(meta or {}), **sample,
        "measures": measures, "thresholds": asdict(thresholds), "checks": checks,
        "failed": [c["measure"] for c in checks if not c["passed"]],
    }
    report["passed"] = not report["failed"]
    if baseline is not None:
        report["change"] = change_since(measures, baseline)
    return report


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_markdown(report: dict) -> str:
    """The report as markdown: the verdict, the checks, the measures (with the change since a baseline)."""
    verdict = "PASSED" if report["passed"] else "FAILED: " + ", ".join(report["failed"])
    lines = [f"# qadapter check: {verdict}", ""]
    if report.get("adapter"):
        read = f" (read: {report['data_read']})" if report.get("data_read") else ""
        lines.append(f"Adapter `{report['adapter']}` on data `{report.get('data')}`{read}: {report['pairs']} pairs, "
                     f"{report['probe_items']} probe questions, {report['passages']} general passage"
                     f"{'s' * (report['passages'] != 1)}.")
        if report.get("data_is_training_data"):
            lines.append("**The data is the adapter's training data** (its provenance says so): the preference "
                         "measures overstate what it learned.")
        lines.append("")
    lines += ["| check | kind | value | rule | limit | result |", "|---|---|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['measure']} | {c['kind']} | {_number(c['value'])} | {c['rule']} | {_number(c['limit'])} "
                     f"| {'pass' if c['passed'] else '**FAIL**'} |")
    change = report.get("change")
    lines += ["", "| measure | value |" + (" before | change |" if change is not None else ""),
              "|---|---|" + ("---|---|" if change is not None else "")]
    for name, value in report["measures"].items():
        row = f"| {name} | {_number(value)} |"
        if change is not None:
            c = change.get(name)
            row += f" {_number(c['before'])} | {c['delta']:+.4g} |" if c else " | |"
        lines.append(row)
    return "\n".join(lines) + "\n"
