"""The stacked-adapters benchmark (``python -m bench.stacked``) runs its whole path on a tiny base in
seconds: the first level, both stacks on it, the joint adapter, their measures and the result JSON."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")

from helpers import save_tiny_base  # noqa: E402

from bench import stacked  # noqa: E402


def test_every_run_on_a_tiny_base(tmp_path, capsys):
    save_tiny_base(tmp_path / "base")
    argv = ["--model", str(tmp_path / "base"), "--steps", "1", "--seed", "3", "--heldout-limit", "3", "--probe-items",
            "2", "--passages", "1", "--answer-tokens", "4", "--max-length", "160", "--max-prompt-length", "32",
            "--output", str(tmp_path / "runs"), "--out", str(tmp_path / "results")]
    assert stacked.main(argv) == 0
    [path] = (tmp_path / "results").glob("stacked-second-from-first-cpu-*.json")
    result = json.loads(path.read_text())
    runs = result["runs"]
    assert list(runs) == ["level1", "stacked", "stacked-base-q", "joint"]
    assert [runs[name]["stack_depth"] for name in runs] == [0, 1, 1, 0]
    assert runs["joint"]["steps"] == 2 and runs["stacked"]["steps"] == 1 and result["options"]["seed"] == 3
    assert result["train_pairs"]["joint"] == result["train_pairs"]["tldr"] + result["train_pairs"]["bullets"]
    assert result["heldout_pairs"] == {"tldr": 3, "bullets": 3} and result["probe_items"] == 2
    assert set(result["data"]) == {"train/tldr", "train/bullets", "train/joint", "heldout/tldr", "heldout/bullets"}
    for row in (*runs.values(), result["base"]):
        assert 0 <= row["tldr_rate"] <= 1 and 0 <= row["bullets_rate"] <= 1
    for row in runs.values():
        assert row["kl_to_base"] >= 0 and 0 <= row["probe_accuracy"] <= 1 and row["perplexity"] > 0
    assert {"python", "torch", "transformers", "peft", "device"} <= result["versions"].keys()
    assert result["cpu"].startswith("CPU ") and result["device"] == "cpu"
    config = json.loads((tmp_path / "runs" / "stacked" / "qadapter_config.json").read_text())
    assert config["stack"][0]["path"] == str((tmp_path / "runs" / "level1").resolve()) and config["q_on"] == "parent"
    assert "stacked:" in capsys.readouterr().out
    # The second preference's pairs as the first customization writes its answers: TL;DR first.
    assert result["options"]["second_from"] == "first"
