"""Every saved adapter says what it is (provenance.json), and `qadapter info` reads it back."""

import hashlib
import json

import pytest
import torch
from helpers import rows, save_tiny_base, training_setup
from qadapter.cli import main
from qadapter.library.model import QAdapterModel
from qadapter.library.provenance import PROVENANCE_NAME, read_provenance, rows_hash


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An adapter trained by `qadapter train` on a file with one malformed line (skipped)."""
    tmp = tmp_path_factory.mktemp("provenance")
    save_tiny_base(tmp / "base")
    data = tmp / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows(6, seed=0)) + "\n{not json\n")
    adapter = tmp / "adapter"
    argv = ["train", "--model", str(tmp / "base"), "--data", str(data), "--output", str(adapter), "--skip-invalid",
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--seed", "7",
            "--use_cpu", "true", "--save_strategy", "no", "--logging_steps", "1"]
    assert main(argv) == 0
    return tmp, data, adapter


def test_info_equals_what_training_used(trained, capsys):
    tmp, data, adapter = trained
    capsys.readouterr()
    assert main(["info", str(adapter), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["provenance_problem"] is None and shown["config_problem"] is None
    record = shown["provenance"]
    assert record == json.loads((adapter / PROVENANCE_NAME).read_text())
    # the data: source, content hash, rows read, kept and skipped
    assert record["data"]["source"] == str(data)
    assert record["data"]["file_sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert (record["data"]["rows"], record["data"]["kept"], record["data"]["skipped"]) == (7, 6, 1)
    # every training option, as given
    options = record["training"]["options"]
    assert options["learning_rate"] == 1e-3 and options["max_steps"] == 2 and options["seed"] == 7
    assert options["per_device_train_batch_size"] == 2 and options["alpha_0"] is not None
    assert record["training"]["global_step"] == 2 and record["training"]["completed"]
    # the base, the versions, the metrics, the time
    model = QAdapterModel.from_pretrained(adapter)
    assert record["base"] == {"name": str(tmp / "base"), "fingerprint": model.fingerprint, "quantization": None}
    assert record["parent_adapter"] is None
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["qadapter-kernels"]
    assert "train_loss" in record["metrics"] and "rewards/accuracies" in record["metrics"]
    assert record["created"].endswith("+00:00")
    # the human-readable form names the same things
    assert main(["info", str(adapter)]) == 0
    text = capsys.readouterr().out
    for needle in (str(data), record["data"]["file_sha256"], "kept 6, skipped 1", model.fingerprint,
                   "learning_rate=0.001", "train_loss="):
        assert needle in text


@pytest.mark.parametrize("damage", ["missing", "corrupt", "foreign"])
def test_missing_or_corrupt_provenance_is_reported_and_the_adapter_still_loads(trained, tmp_path, damage, capsys):
    import shutil

    _, _, adapter = trained
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    if damage == "missing":
        (copy / PROVENANCE_NAME).unlink()
    elif damage == "corrupt":
        (copy / PROVENANCE_NAME).write_text('{"provenance_version": 1, "data": {')
    else:  # JSON, but another tool's object: not taken for a record
        (copy / PROVENANCE_NAME).write_text('{"data": null, "training": {"options": {}}}')
    record, problem = read_provenance(copy)
    expected = {"missing": "missing", "corrupt": "corrupted", "foreign": "is not a provenance record"}[damage]
    assert record is None and expected in problem
    capsys.readouterr()
    assert main(["info", str(copy)]) == 0
    assert "provenance: PROBLEM" in capsys.readouterr().out
    assert main(["info", str(copy), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["provenance"] is None and shown["provenance_problem"] == problem
    assert shown["config"]["base_fingerprint"]
    QAdapterModel.from_pretrained(copy)  # loads all the same


def test_trainer_alone_records_options_metrics_and_data_in_every_save(tmp_path):
    from qadapter.library.trainer import QAdapterTrainer

    model, tokenizer, args, train, _ = training_setup(tmp_path / "run", max_steps=2, save_strategy="steps",
                                                      save_steps=1)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    checkpoint, _ = read_provenance(tmp_path / "run" / "checkpoint-1")
    assert checkpoint["training"]["global_step"] == 1 and not checkpoint["training"]["completed"]
    model.save_pretrained(tmp_path / "adapter")
    record, problem = read_provenance(tmp_path / "adapter")
    assert problem is None
    assert record["training"]["options"]["learning_rate"] == args.learning_rate
    assert record["training"]["completed"] and record["metrics"]["train_loss"] > 0
    assert record["data"]["rows"] == len(train) and record["data"]["rows_sha256"] == rows_hash(train)
    assert not list((tmp_path / "adapter").glob(".qadapter-saving-*"))  # staged with the adapter, then moved


def test_a_plain_save_records_base_and_versions_without_training(tmp_path):
    from helpers import make_model

    model = make_model()
    model.save_pretrained(tmp_path)
    record, problem = read_provenance(tmp_path)
    assert problem is None and record["training"] is None and record["data"] is None
    assert record["base"]["fingerprint"] == model.fingerprint


def test_info_on_a_directory_without_an_adapter_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["info", str(tmp_path)])
    assert exc.value.code == 2 and "qadapter_config.json is missing" in capsys.readouterr().err


def test_rows_holding_a_lone_surrogate_have_a_hash():
    """A row skipped for a lone surrogate (JSON's ``\\ud800`` escape outside a pair), or one with it in
    a column training does not read, is still among the rows read: hashed, not an encoding error."""
    rows = [{"prompt": "a \ud800", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "id": "\udfff"}]
    assert rows_hash(rows) != rows_hash([{**rows[0], "prompt": "a"}, rows[1]])


def test_the_rows_hash_does_not_depend_on_the_order_of_a_row_s_keys():
    """The same rows from a file that writes its columns in another order (a JSONL file against a
    parquet one, say) are the same training data: one hash."""
    a = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "q", "chosen": "d", "rejected": "s"}]
    b = [{"rejected": row["rejected"], "chosen": row["chosen"], "prompt": row["prompt"]} for row in a]
    assert rows_hash(a) == rows_hash(b) != rows_hash(a[::-1])


def test_the_data_identity_counts_every_skipped_row_and_each_reason():
    from collections import Counter

    from qadapter.library.data import DataSummary
    from qadapter.library.provenance import data_identity

    rows = [{"prompt": str(k)} for k in range(6)]
    summary = DataSummary(rows=6, kept=3, truncated=1, skipped=Counter({"not JSON": 2, "empty chosen": 1}))
    identity = data_identity(rows, rows, summary)  # rows given in memory: no source, no file hash
    assert identity["kind"] == "memory" and identity["source"] is None and identity["file_sha256"] is None
    assert (identity["rows"], identity["kept"], identity["truncated"]) == (6, 3, 1)
    assert identity["skipped"] == 3 and identity["skipped_reasons"] == {"not JSON": 2, "empty chosen": 1}
    assert identity["rows_sha256"] == rows_hash(rows)
