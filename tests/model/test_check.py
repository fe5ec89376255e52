"""`qadapter check`: an adapter measured against its base, failed by name when it forgets."""

import dataclasses
import json
import re

import pytest
import torch
from helpers import perturb_adapter, rows, tiny_causal_lm, tiny_chat_tokenizer
from qadapter.cli import main
from qadapter.evaluation.check import Thresholds, judge, run_check
from qadapter.library.model import QAdapterModel

QUICK = ["--probe-items", "6", "--passages", "2"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """An untrained adapter and one made to forget (LoRA B set large), on one tiny local base."""
    tmp = tmp_path_factory.mktemp("check")
    # A random tiny model predicts almost uniformly, and nothing its LoRA does moves that far; a
    # sharper head gives it confident predictions, as a trained base has, which an adapter can ruin.
    tokenizer = tiny_chat_tokenizer()
    base = tiny_causal_lm("llama", vocab=len(tokenizer))
    with torch.no_grad():
        base.lm_head.weight.mul_(10)
    base.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    data = tmp / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows(8, seed=1)) + "\n")
    model = QAdapterModel.from_base(str(tmp / "base"))
    model.save_pretrained(tmp / "untrained")
    perturb_adapter(model, seed=3, scale=3.0)
    model.save_pretrained(tmp / "forgot")
    return tmp, data


def _check(adapter, data, *extra):
    return main(["check", str(adapter), "--data", str(data), *QUICK, *extra])


def test_untrained_adapter_keeps_everything_and_learned_nothing(adapters, capsys):
    tmp, data = adapters
    capsys.readouterr()
    assert _check(tmp / "untrained", data) == 1
    err = capsys.readouterr().err
    report = json.loads((tmp / "untrained" / "check.json").read_text())
    assert report["failed"] == ["preference_gain"] and "FAILED preference_gain" in err
    verdicts = {c["measure"]: c["passed"] for c in report["checks"]}
    assert verdicts == {"preference_gain": False, "kl_to_base": True, "probe_drop": True, "perplexity_ratio": True}
    m = report["measures"]
    assert m["preference_accuracy"] == m["step0_preference_accuracy"] and m["kl_to_base"] < 1e-2
    assert m["probe_accuracy"] == m["base_probe_accuracy"] and m["perplexity_ratio"] < 1.1
    assert (report["pairs"], report["probe_items"], report["passages"]) == (8, 6, 2)
    assert report["provenance"]["base"]["name"] == str(tmp / "base")  # which adapter the report is about
    assert (tmp / "untrained" / "check.md").read_text().startswith("# qadapter check: FAILED: preference_gain")


def test_skipped_rows_are_reported(adapters, tmp_path, capsys):
    """--skip-invalid: what was read and skipped is in the report and on stderr, as eval and train say it."""
    tmp, data = adapters
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(data.read_text() + '{"prompt": "a", "chosen": "b"}\nnot json\n')
    capsys.readouterr()
    _check(tmp / "untrained", mixed, "--output", str(tmp_path / "out"), "--skip-invalid")
    read = json.loads((tmp_path / "out" / "check.json").read_text())["data_read"]
    assert read.startswith("8/10 pairs kept") and "missing key 'rejected': 1" in read
    assert f"data: {read}" in capsys.readouterr().err
    assert f"(read: {read})" in (tmp_path / "out" / "check.md").read_text()


def test_forgetting_adapter_fails_retention_by_name(adapters, tmp_path, capsys):
    tmp, data = adapters
    capsys.readouterr()
    assert _check(tmp / "forgot", data, "--output", str(tmp_path), "--min-preference-gain", "-1") == 1
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "check.json").read_text())
    assert "kl_to_base" in report["failed"]
    assert "preference_gain" not in report["failed"]
    assert "FAILED kl_to_base" in err and "--max-kl-to-base" in err
    assert report["measures"]["kl_to_base"] > 0.5
    # It answers fewer probe questions than its base: a drop, failed by name. The retention measures
    # are the changes from the base, in the direction a larger value is worse.
    m = report["measures"]
    assert m["probe_accuracy"] < m["base_probe_accuracy"] - 0.05 and "probe_drop" in report["failed"]
    assert m["probe_drop"] == pytest.approx(m["base_probe_accuracy"] - m["probe_accuracy"])
    assert m["perplexity_ratio"] == pytest.approx(m["perplexity"] / m["base_perplexity"])
    for check in report["checks"]:
        value, limit = m[check["measure"]], check["limit"]
        assert check["passed"] == (value >= limit if check["rule"] == ">=" else value <= limit)
        assert (check["measure"] in report["failed"]) == (not check["passed"])


def test_baseline_report_shows_the_change_since(adapters, tmp_path, capsys):
    tmp, data = adapters
    first, second = tmp_path / "first", tmp_path / "second"
    _check(tmp / "untrained", data, "--output", str(first))
    _check(tmp / "forgot", data, "--output", str(second), "--baseline", str(first / "check.json"))
    capsys.readouterr()
    before_report = json.loads((first / "check.json").read_text())
    before = before_report["measures"]
    report = json.loads((second / "check.json").read_text())
    change = report["change"]["kl_to_base"]
    assert change["before"] == before["kl_to_base"] and change["after"] == report["measures"]["kl_to_base"]
    assert change["delta"] == pytest.approx(change["after"] - change["before"]) and change["delta"] > 0.5
    assert "| kl_to_base |" in (second / "check.md").read_text() and "before" in (second / "check.md").read_text()
    # Against a baseline of another sample the change would mean nothing: refused before measuring.
    with pytest.raises(SystemExit) as info:
        _check(tmp / "forgot", data, "--output", str(tmp_path / "third"), "--baseline", str(first / "check.json"),
               "--probe-items", "3")
    assert info.value.code == 2
    assert f"probe_items {before_report['probe_items']} there, 3 here (--probe-items)" in capsys.readouterr().err
    assert not (tmp_path / "third").exists()
    # As many pairs, but other ones (another --data): refused too.
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(r) for r in rows(8, seed=2)) + "\n")
    with pytest.raises(SystemExit) as info:
        _check(tmp / "forgot", other, "--output", str(tmp_path / "fourth"), "--baseline", str(first / "check.json"))
    assert info.value.code == 2 and "the pairs' tokens differ (--data," in capsys.readouterr().err
    assert not (tmp_path / "fourth").exists()


def test_a_baseline_of_an_adapter_prompted_otherwise_is_refused_naming_its_template_options(tmp_path, capsys):
    """Adapters trained with other chat template options (Qwen3's enable_thinking) are measured on
    prompts rendered otherwise: the change would compare different things, and the refusal says why,
    not that the data or its lengths differ."""
    from helpers import tiny_thinking_tokenizer

    tokenizer = tiny_thinking_tokenizer()
    tiny_causal_lm("llama", vocab=len(tokenizer)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows(4, seed=1)) + "\n")
    QAdapterModel.from_base(str(tmp_path / "base")).save_pretrained(tmp_path / "plain")
    QAdapterModel.from_base(str(tmp_path / "base"), chat_template_kwargs={"enable_thinking": False}).save_pretrained(
        tmp_path / "quiet")
    _check(tmp_path / "plain", data, "--output", str(tmp_path / "first"))
    assert json.loads((tmp_path / "first" / "check.json").read_text())["chat_template_kwargs"] == {}
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        _check(tmp_path / "quiet", data, "--output", str(tmp_path / "second"), "--baseline",
               str(tmp_path / "first" / "check.json"))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "chat_template_kwargs {} there, {'enable_thinking': False} here" in err
    assert "the pairs' tokens differ" not in err


def test_thresholds_file_and_flags(adapters, tmp_path, capsys):
    tmp, data = adapters
    config = tmp_path / "thresholds.json"
    config.write_text(json.dumps({"min_preference_gain": None, "max_kl_to_base": 0.01}))
    assert _check(tmp / "untrained", data, "--output", str(tmp_path), "--thresholds", str(config)) == 0
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["passed"] and report["thresholds"]["max_kl_to_base"] == 0.01
    assert "preference_gain" not in {c["measure"] for c in report["checks"]}
    # a flag wins over the file
    assert _check(tmp / "untrained", data, "--output", str(tmp_path), "--thresholds", str(config),
                  "--min-preference-accuracy", "0.9") == 1
    assert json.loads((tmp_path / "check.json").read_text())["failed"] == ["preference_accuracy"]
    config.write_text(json.dumps({"max_kl": 1}))
    with pytest.raises(SystemExit) as exc:
        _check(tmp / "untrained", data, "--thresholds", str(config))
    assert exc.value.code == 2 and "max_kl" in capsys.readouterr().err
    config.write_text('{"max_kl_to_base": NaN}')  # Python's json reads it; the report would not be JSON
    with pytest.raises(SystemExit) as exc:
        _check(tmp / "untrained", data, "--thresholds", str(config))
    assert exc.value.code == 2 and "max_kl_to_base must be a finite number or null" in capsys.readouterr().err


def test_a_thresholds_file_from_a_windows_editor_is_read(tmp_path):
    """Notepad's byte-order mark and CRLF are no part of the JSON; a file in another encoding is
    named, not an undecodable byte alone."""
    config = tmp_path / "thresholds.json"
    config.write_bytes(b'\xef\xbb\xbf{"max_kl_to_base": 0.5}\r\n')
    assert Thresholds.from_file(config).max_kl_to_base == 0.5
    config.write_bytes('{"max_kl_to_base": 0.5}'.encode("utf-16"))
    with pytest.raises(ValueError, match=rf"thresholds file {re.escape(str(config))} is not UTF-8 text"):
        Thresholds.from_file(config)


@pytest.mark.parametrize("option, value", [("probe_items", True), ("passages", False), ("probe_items", -1),
                                           ("passages", 2.0)])
def test_sample_sizes_from_python_are_refused_by_name(option, value):
    """A bool would measure one item or none, a negative none, without a word: refused before measuring."""
    error = ValueError if value == -1 else TypeError
    with pytest.raises(error, match=re.escape(f"{option} must be an integer >= 0 (0: skip) or None (all of them); "
                                                   f"got {value!r}")):
        run_check(None, [], Thresholds(), **{option: value})


def test_judge_directions():
    checks = judge({"preference_gain": 0.1, "kl_to_base": 0.7}, Thresholds(max_probe_drop=None))
    assert [(c["measure"], c["passed"]) for c in checks] == [("preference_gain", True), ("kl_to_base", False)]


def test_checking_on_the_training_data_is_said_in_the_report(adapters, tmp_path, capsys):
    import shutil

    from qadapter.library.provenance import PROVENANCE_NAME, file_hash

    tmp, data = adapters
    adapter = tmp_path / "adapter"
    shutil.copytree(tmp / "untrained", adapter)
    record = json.loads((adapter / PROVENANCE_NAME).read_text())
    record["data"] = {"kind": "file", "source": "elsewhere.jsonl", "file_sha256": file_hash(data), "rows_sha256": None}
    (adapter / PROVENANCE_NAME).write_text(json.dumps(record))
    _check(adapter, data, "--output", str(tmp_path / "report"))
    assert "warning: " in capsys.readouterr().err
    assert json.loads((tmp_path / "report" / "check.json").read_text())["data_is_training_data"] is True
    assert "**The data is the adapter's training data**" in (tmp_path / "report" / "check.md").read_text()


def test_thresholds_from_python_take_numpy_numbers_and_refuse_other_types_by_name():
    """A numpy limit is kept as a float (the report is written as JSON); a string fails only once
    measured, a bool is a limit of 1 or 0, NaN fails every check: each refused naming the threshold."""
    import numpy as np

    thresholds = Thresholds(max_kl_to_base=np.float32(0.5), min_preference_accuracy=np.int64(0))
    assert type(thresholds.max_kl_to_base) is float and json.dumps(dataclasses.asdict(thresholds))
    assert judge({"kl_to_base": 0.25}, thresholds)[0]["passed"]
    for value in ("0.5", True, float("nan"), [0.5]):
        with pytest.raises(ValueError, match=re.escape(f"max_kl_to_base must be a finite number or None; got {value!r}")):
            Thresholds(max_kl_to_base=value)


def test_a_measure_at_its_limit_passes_and_a_limit_set_to_none_checks_nothing():
    """``min_*``: at least the limit; ``max_*``: at most. Exactly at the limit meets both."""
    limits = Thresholds(min_preference_accuracy=0.75, min_preference_gain=0.25, max_kl_to_base=0.5,
                        max_probe_drop=0.125, max_perplexity_ratio=None)
    at = {"preference_accuracy": 0.75, "preference_gain": 0.25, "kl_to_base": 0.5, "probe_drop": 0.125,
          "perplexity_ratio": 9.0}
    checks = judge(at, limits)
    assert [(c["measure"], c["rule"], c["passed"]) for c in checks] == [
        ("preference_accuracy", ">=", True), ("preference_gain", ">=", True), ("kl_to_base", "<=", True),
        ("probe_drop", "<=", True)]  # no perplexity check: its limit is None
    below = judge({**at, "preference_accuracy": 0.5, "probe_drop": 0.25}, limits)
    assert [c["measure"] for c in below if not c["passed"]] == ["preference_accuracy", "probe_drop"]


def test_a_subsample_spreads_over_the_items_in_their_order():
    from qadapter.evaluation.check import subsample

    # 5 of 10: every second one, from the first; 3 of 10: items 0, 10 // 3 = 3 and 20 // 3 = 6.
    assert subsample(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert subsample(list(range(10)), 3) == [0, 3, 6]
    assert subsample(list(range(4)), None) == subsample(list(range(4)), 9) == [0, 1, 2, 3]
    assert subsample(list(range(4)), 0) == []
