"""Learning curves: does training beat the base's own preference, and when?

:class:`LearningCurve` is a ``transformers.TrainerCallback`` that measures held-out pairs at step 0
(the untrained adapter: its rewards are the base model's own likelihood preference), every
``every`` optimizer steps and at the end: preference accuracy with its 95% binomial (Wilson)
interval, margin, loss and the mean per-token KL of the customized policy to the base. Each point
keeps which pairs it ranks right, so every later point is also compared with step 0 on the same
pairs (McNemar's exact test: a paired test, sharper than comparing the two intervals). Each
point is written at once to ``curve.json`` (atomically), and ``curve.png`` is drawn from it, so a
run cut short keeps every point it measured, and a run resumed from a checkpoint goes on with the
points measured up to that step (of the same held-out pairs).
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

from transformers import TrainerCallback

from qadapter_kernels.config import check_integer

from ..library import atomic
from .measures import evaluate_pairs


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96)."""
    if trials <= 0:
        raise ValueError(f"trials must be positive; got {trials}")
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value of ``gained`` pairs ranked right only after and ``lost`` only
    before: under no change each discordant pair is a fair coin."""
    n, k = gained + lost, min(gained, lost)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_change(before: str, after: str) -> dict:
    """Pairs ranked right at one point but not the other (``before``/``after``: one '1' or '0' per
    pair, the same pairs in the same order) and McNemar's exact p-value of the change."""
    if len(before) != len(after):
        raise ValueError(f"the two points must rank the same pairs; got {len(before)} and {len(after)}")
    gained = sum(b == "0" and a == "1" for b, a in zip(before, after))
    lost = sum(b == "1" and a == "0" for b, a in zip(before, after))
    return {"gained": gained, "lost": lost, "p_value": mcnemar_exact(gained, lost)}


class LearningCurve(TrainerCallback):
    """Held-out measures at step 0, every ``every`` steps and at the end, into ``directory``."""

    def __init__(self, features: list[dict], pad_token_id: int, directory: str | Path, *, every: int,
                 kl: bool = True, progress: bool = False, meta: dict | None = None):
        if not features:
            raise ValueError("the learning curve needs held-out pairs (features is empty)")
        every = check_integer("every", every, least=1, note=" (steps)")
        self.features, self.pad_token_id, self.every = features, pad_token_id, every
        self.kl, self.progress = kl, progress
        self.writes = True  # under a launcher, the main process alone writes (and shows progress)
        self.directory = Path(directory)
        self.record = {"heldout_pairs": len(features), "every": every, **(meta or {}), "points": []}
        self._started = time.monotonic()

    @property
    def points(self) -> list[dict]:
        return self.record["points"]

    def measure(self, model, step: int) -> dict:
        """One point of the curve, written out before it is returned."""
        if self.points and self.points[-1]["step"] == step:
            return self.points[-1]
        metrics = evaluate_pairs(model, self.features, self.pad_token_id, kl=self.kl,
                                 progress=self.progress and self.writes, per_pair=True)
        ranked = "".join("1" if margin > 0 else "0" for margin in metrics["margins"])
        low, high = wilson_interval(ranked.count("1"), len(self.features))
        point = {"step": step, "accuracy": metrics["accuracy"], "accuracy_95": [low, high],
                 "margin": metrics["margin"], "loss": metrics["loss"],
                 "kl_to_base": metrics.get("kl_to_base"), "train_seconds": round(time.monotonic() - self._started, 1),
                 "ranked_right": ranked}
        if self.points and self.points[0]["step"] == 0:
            point["vs_step0"] = paired_change(self.points[0]["ranked_right"], ranked)
        self.points.append(point)
        if self.writes:
            self.write()
        return point

    def write(self) -> None:
        atomic.write_json(self.directory / "curve.json", self.record)
        plot_curve(self.record, self.directory / "curve.png")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.writes = state.is_world_process_zero  # every process measures (ZeRO-3's forward is a collective)
        if state.global_step == 0:
            self.measure(model, 0)
        else:
            self.resume(state.global_step)

    def resume(self, step: int) -> None:
        """Goes on with the points the stopped run measured up to ``step`` (its checkpoint's), read from
        ``curve.json`` where it is a curve of the same measure (held-out pairs, step interval, what
        ``meta`` says); otherwise, said, this curve starts at its first point after ``step``."""
        path = self.directory / "curve.json"
        try:
            earlier = atomic.read_json(path, "the learning curve") if path.is_file() else None
            points = [p for p in earlier["points"] if p["step"] <= step and "train_seconds" in p] if earlier else []
        except (ValueError, TypeError, KeyError):  # not a curve this code wrote: none to go on with
            earlier, points = {}, []
        same = bool(earlier) and {k: v for k, v in earlier.items() if k != "points"} == \
            {k: v for k, v in self.record.items() if k != "points"}
        if not same or not points:
            if self.writes:
                why = "none there" if earlier is None else "that one is of another measure, or unreadable"
                warnings.warn(f"the learning curve before the resumed step {step} is not in {path} ({why}): this "
                              "run's curve, written there anew, starts at its first point after that step",
                              stacklevel=2)
            return
        self.points[:] = points
        self._started = time.monotonic() - points[-1]["train_seconds"]  # the training time goes on

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self.measure(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.measure(model, state.global_step)


def plot_curve(record: dict, path: str | Path) -> bool:
    """Accuracy with its 95% band (and the step-0 level) and KL to the base against steps, as a PNG;
    False, with nothing written, where matplotlib is not installed (:func:`atomic.pyplot` warns)."""
    plt = atomic.pyplot(path)
    if plt is None:
        return False
    points = record["points"]
    steps = [p["step"] for p in points]
    fig, acc_axis = plt.subplots(figsize=(6.4, 3.8))
    acc_axis.plot(steps, [p["accuracy"] for p in points], "o-", color="tab:blue", label="held-out accuracy")
    acc_axis.fill_between(steps, [p["accuracy_95"][0] for p in points], [p["accuracy_95"][1] for p in points],
                          color="tab:blue", alpha=0.15, label="95% interval")
    if steps[0] == 0:
        acc_axis.axhline(points[0]["accuracy"], color="gray", ls="--", lw=1, label="step 0 (base's own preference)")
    acc_axis.set_xlabel("optimizer step")
    acc_axis.set_ylabel("preference accuracy")
    handles, labels = acc_axis.get_legend_handles_labels()
    if any(p["kl_to_base"] is not None for p in points):
        kl_axis = acc_axis.twinx()
        kl_axis.plot(steps, [p["kl_to_base"] for p in points], "s:", color="tab:red", label="KL to base / token")
        kl_axis.set_ylabel("KL to base per token")
        more_handles, more_labels = kl_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    acc_axis.legend(handles, labels, fontsize=8, loc="best")
    title = f"{record['heldout_pairs']} held-out pairs"
    change = points[-1].get("vs_step0")
    if change:
        title += f"; step {steps[-1]} vs 0: +{change['gained']} / -{change['lost']} pairs, McNemar p = {change['p_value']:.3g}"
    acc_axis.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)
    return True
