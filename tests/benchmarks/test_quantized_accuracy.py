"""The dense-vs-4-bit accuracy benchmark (``python -m bench.quantized_accuracy``) runs its whole path
on a tiny base in seconds: both runs, the same options, the result JSON with its difference."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from helpers import save_tiny_base  # noqa: E402

from bench import quantized_accuracy  # noqa: E402


def test_both_runs_on_a_tiny_base(tmp_path, capsys):
    save_tiny_base(tmp_path / "base", hidden=64)  # bitsandbytes' CPU 4-bit kernels: inputs in blocks of 64
    argv = ["--model", str(tmp_path / "base"), "--steps", "2", "--seed", "3", "--heldout-limit", "4", "--probe-limit",
            "2", "--answer-tokens", "4", "--max-length", "48", "--max-prompt-length", "32", "--output",
            str(tmp_path / "runs"), "--out", str(tmp_path / "results")]
    assert quantized_accuracy.main(argv) == 0
    [path] = (tmp_path / "results").glob("quantized-accuracy-cpu-*.json")
    result = json.loads(path.read_text())
    dense, nf4 = result["runs"]["dense"], result["runs"]["nf4"]
    assert dense["quantization"] is None
    assert nf4["quantization"] == {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert result["options"]["max_steps"] == 2 and result["options"]["seed"] == 3
    assert "output" not in result["options"] and 0 <= nf4["base_probe_accuracy"] <= 1
    assert dense["heldout_pairs"] == nf4["heldout_pairs"] == 4 and dense["train_pairs"] == nf4["train_pairs"]
    assert result["difference"] == nf4["heldout_accuracy"] - dense["heldout_accuracy"]
    assert result["within_target"] == (abs(result["difference"]) <= 0.05)
    assert {"torch", "transformers", "peft", "bitsandbytes", "device"} <= result["versions"].keys()
    assert result["device"] == "cpu" and result["date"]
    for name in ("dense", "nf4"):  # each run is a demo run: its adapter and report
        assert (tmp_path / "runs" / name / "adapter" / "qadapter_config.json").is_file()
    assert "difference (nf4 - dense)" in capsys.readouterr().out
