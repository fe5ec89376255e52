"""Learning curves: step 0, every k steps and the end, each point written at once."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("peft")
from helpers import default_model_available, training_setup  # noqa: E402
from qadapter.evaluation.curve import LearningCurve, mcnemar_exact, paired_change, wilson_interval  # noqa: E402
from qadapter.evaluation.measures import evaluate_pairs  # noqa: E402
from qadapter.library.trainer import QAdapterTrainer  # noqa: E402

from bench.common import HH_DATA as HH  # noqa: E402


def test_wilson_interval():
    low, high = wilson_interval(50, 100)
    assert abs(low - 0.4038) < 1e-4 and abs(high - 0.5962) < 1e-4
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError, match="trials must be positive"):
        wilson_interval(0, 0)


def test_curve_measures_step_zero_every_k_steps_and_the_end(tmp_path):
    model, tokenizer, args, train, heldout = training_setup(tmp_path / "run", max_steps=10)
    features = heldout
    before = evaluate_pairs(model, features, tokenizer.pad_token_id)
    curve = LearningCurve(features, tokenizer.pad_token_id, tmp_path / "out", every=4, meta={"run": "test"})
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                    callbacks=[curve]).train()
    record = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert [p["step"] for p in record["points"]] == [0, 4, 8, 10]
    assert record["run"] == "test" and record["heldout_pairs"] == len(features)
    first, last = record["points"][0], record["points"][-1]
    assert first["accuracy"] == pytest.approx(before["accuracy"]) and first["kl_to_base"] == pytest.approx(0, abs=1e-6)
    assert last["accuracy"] > first["accuracy"] and last["kl_to_base"] > 0
    for point in record["points"]:
        assert point["accuracy_95"][0] <= point["accuracy"] <= point["accuracy_95"][1]
        ranked = point["ranked_right"]
        assert len(ranked) == len(features) and point["accuracy"] == pytest.approx(ranked.count("1") / len(features))
    assert "vs_step0" not in first
    for point in record["points"][1:]:
        change = point["vs_step0"]
        assert change["gained"] - change["lost"] == round((point["accuracy"] - first["accuracy"]) * len(features))
        assert 0 < change["p_value"] <= 1
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_mcnemar_exact_and_the_paired_change():
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(1, 0) == 1.0
    assert mcnemar_exact(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096) == mcnemar_exact(2, 10)
    assert paired_change("0011", "0110") == {"gained": 1, "lost": 1, "p_value": 1.0}
    with pytest.raises(ValueError, match="same pairs"):
        paired_change("01", "011")


def test_curve_refuses_what_it_cannot_measure(tmp_path):
    with pytest.raises(ValueError, match="needs held-out pairs"):
        LearningCurve([], 0, tmp_path, every=2)
    with pytest.raises(ValueError, match=re.escape("every must be an integer >= 1 (steps); got 0")):
        LearningCurve([{"x": 1}], 0, tmp_path, every=0)


def test_train_command_writes_the_curve(tmp_path, capsys):
    from helpers import rows, tiny_causal_lm, tiny_chat_tokenizer
    from qadapter.cli import main

    tokenizer = tiny_chat_tokenizer()
    tiny_causal_lm("llama", vocab=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    for name, count, seed in (("train.jsonl", 8, 0), ("heldout.jsonl", 6, 1)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows(count, seed)) + "\n")
    common = ["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"),
              "--max_steps", "4", "--per_device_train_batch_size", "2", "--use_cpu", "true", "--save_strategy", "no"]
    with pytest.raises(SystemExit) as exc:
        main([*common, "--output", str(tmp_path / "none"), "--curve-steps", "2"])
    assert exc.value.code == 2 and "--curve-steps needs --eval-data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # Trainer's own evaluation, too
        main([*common, "--output", str(tmp_path / "none"), "--eval_strategy", "steps", "--eval_steps", "2"])
    assert exc.value.code == 2 and "--eval_strategy steps needs --eval-data" in capsys.readouterr().err
    assert main([*common, "--output", str(tmp_path / "adapter"), "--eval-data", str(tmp_path / "heldout.jsonl"),
                 "--curve-steps", "2"]) == 0
    record = json.loads((tmp_path / "adapter" / "curve.json").read_text())
    assert [p["step"] for p in record["points"]] == [0, 2, 4] and record["heldout_pairs"] == 6
    assert "warning" not in capsys.readouterr().err
    # Held out from nothing: the training rows as --eval-data are said to be them.
    assert main([*common, "--output", str(tmp_path / "same"), "--eval-data", str(tmp_path / "train.jsonl")]) == 0
    assert "warning: --eval-data holds the same rows as --data" in capsys.readouterr().err


def test_a_resumed_run_goes_on_with_the_curve_it_measured(tmp_path, capsys):
    """``--resume`` keeps the points measured up to the checkpoint's step (the stopped run's curve.json)
    and compares the later ones with its step 0; a curve of other held-out pairs is said, not mixed in."""
    from helpers import rows, save_tiny_base
    from qadapter.cli import main

    save_tiny_base(tmp_path / "base")
    for name, count, seed in (("train.jsonl", 8, 0), ("heldout.jsonl", 6, 1), ("other.jsonl", 5, 2)):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows(count, seed)) + "\n")
    output = tmp_path / "adapter"
    common = ["train", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"), "--output",
              str(output), "--per_device_train_batch_size", "2", "--use_cpu", "true", "--save_steps", "2",
              "--curve-steps", "2"]
    assert main([*common, "--eval-data", str(tmp_path / "heldout.jsonl"), "--max_steps", "2"]) == 0
    stopped = json.loads((output / "curve.json").read_text())["points"]
    with pytest.warns(UserWarning, match="max_steps 4"):
        assert main([*common, "--eval-data", str(tmp_path / "heldout.jsonl"), "--max_steps", "4", "--resume"]) == 0
    points = json.loads((output / "curve.json").read_text())["points"]
    assert [p["step"] for p in points] == [0, 2, 4] and points[:2] == stopped
    assert points[2]["vs_step0"]["gained"] - points[2]["vs_step0"]["lost"] == round(
        (points[2]["accuracy"] - points[0]["accuracy"]) * 6)
    assert points[2]["train_seconds"] >= points[1]["train_seconds"]
    capsys.readouterr()
    with pytest.warns(UserWarning) as caught:
        assert main([*common, "--eval-data", str(tmp_path / "other.jsonl"), "--max_steps", "6", "--resume"]) == 0
    assert any("curve before the resumed step 4 is not in" in str(w.message) and "another measure" in str(w.message)
               for w in caught)
    points = json.loads((output / "curve.json").read_text())["points"]
    assert [p["step"] for p in points] == [6] and "vs_step0" not in points[0]
    (output / "curve.json").write_text("[1, 2")  # damaged: the run still resumes, with a curve of its own
    with pytest.warns(UserWarning) as caught:
        assert main([*common, "--eval-data", str(tmp_path / "other.jsonl"), "--max_steps", "8", "--resume"]) == 0
    assert any("curve before the resumed step 6 is not in" in str(w.message) for w in caught)
    assert [p["step"] for p in json.loads((output / "curve.json").read_text())["points"]] == [8]
    # A run started anew (--overwrite) keeps no curve of the run it replaces.
    assert main([*common[:-2], "--eval-data", str(tmp_path / "other.jsonl"), "--max_steps", "2", "--overwrite"]) == 0
    assert not (output / "curve.json").exists() and not (output / "curve.png").exists()


@pytest.mark.skipif(not HH.is_file() or not default_model_available(),
                    reason="needs the shared HH-RLHF subset and the embedded default model")
def test_hh_curve_quick_mode(tmp_path):
    """bench.hh_curve end to end on the real data: a few steps and pairs, every point measured."""
    from bench.hh_curve import main

    main(["--quick", "--preset", "small", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "small-curve.json").read_text())
    assert [p["step"] for p in record["points"]] == [0, 1, 2]
    assert record["heldout_pairs"] == 4 and (tmp_path / "small-curve.png").is_file()


def test_without_matplotlib_the_figure_is_not_drawn_and_a_warning_says_so(tmp_path, monkeypatch):
    import sys

    from qadapter.evaluation.curve import plot_curve

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    record = {"points": [{"step": 0, "accuracy": 0.5, "low": 0.3, "high": 0.7, "kl": 0.0}]}
    with pytest.warns(UserWarning, match=r"curve.png is not drawn: matplotlib is not installed \(pip install "
                                         r"\"qadapter-kernels\[plot\]\"\)"):
        assert plot_curve(record, tmp_path / "curve.png") is False
    assert not (tmp_path / "curve.png").exists()
