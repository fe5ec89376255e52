"""QAdapterTrainer on a tiny random model: it learns a preference, logs the preference metrics,
checkpoints only the adapter, and resumes exactly."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import replace

import pytest
import torch

pytest.importorskip("peft")
from helpers import perturb_adapter, tiny_causal_lm, tiny_chat_tokenizer, training_setup  # noqa: E402
from qadapter.evaluation.measures import evaluate_pairs, preference_metrics  # noqa: E402
from qadapter.library import atomic  # noqa: E402
from qadapter.library.data import PreferenceCollator  # noqa: E402
from qadapter.library.model import AdapterLoadError, QAdapterModel  # noqa: E402
from qadapter.library.trainer import (  # noqa: E402
    METRIC_NAMES,
    TOKEN_SHARE,
    QAdapterConfig,
    QAdapterTrainer,
    may_skip_trainable,
)

from qadapter_kernels import LossConfig  # noqa: E402


def fresh_base():
    """The base model ``setup`` trains on, without an adapter attached."""
    return tiny_causal_lm("llama", vocab=len(tiny_chat_tokenizer()))


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if "lora_" in n}


def test_training_learns_the_preference_and_logs_metrics(tmp_path):
    model, tokenizer, args, train, heldout = training_setup(tmp_path, max_steps=24)
    before = preference_metrics(model, heldout, tokenizer.pad_token_id)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    after = preference_metrics(model, heldout, tokenizer.pad_token_id)
    assert after["loss"] < before["loss"] - 0.05
    assert before["accuracy"] < 0.5 <= 0.9 <= after["accuracy"]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(name in logged[0] for name in [*METRIC_NAMES.values(), TOKEN_SHARE])
    assert all(0 < entry[TOKEN_SHARE] < 1 for entry in logged)  # padding-free: the pairs' prompts run once
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]


@pytest.mark.parametrize("container", ["list", "datasets"])
def test_raw_preference_rows_are_tokenized_as_the_command_line_does(tmp_path, container):
    """Rows of prompt/chosen/rejected train as their tokenized pairs (the config's lengths); rows the
    collator cannot take are refused by name, not with a KeyError."""
    from helpers import rows
    from qadapter.library.data import PreferenceCollator

    trained = {}
    for kind in ("tokenized", "raw"):
        model, tokenizer, args, train, _ = training_setup(tmp_path / kind, max_steps=3, max_length=48)
        if kind == "raw":
            train = rows(32, seed=0)
            if container == "datasets":
                datasets = pytest.importorskip("datasets")
                train = datasets.Dataset.from_list(train)
        QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
        trained[kind] = lora_state(model)
    for name, value in trained["tokenized"].items():
        torch.testing.assert_close(trained["raw"][name], value, rtol=0, atol=0)
    with pytest.raises(ValueError, match="takes tokenized pairs .*load_preference_data"):
        PreferenceCollator(pad_token_id=0)([{"question": "?", "answer": "!"}])
    with pytest.raises(ValueError, match="train_dataset holds raw preference rows .*processing_class="):
        QAdapterTrainer(model=fresh_base(), args=args, train_dataset=rows(2, seed=0))
    malformed_first = [{"prompt": "a", "chosen": "b"}, *rows(2, seed=0)]  # raw rows all the same: named
    with pytest.raises(ValueError, match="preference row 0: missing key 'rejected'"):
        QAdapterTrainer(model=fresh_base(), args=args, train_dataset=malformed_first, processing_class=tokenizer)
    # skip_invalid skips and counts them; the adapter's provenance says what was read.
    model = QAdapterModel(fresh_base(), tokenizer=tokenizer, **args.model_options())
    trainer = QAdapterTrainer(model=model, args=replace(args, skip_invalid=True), train_dataset=malformed_first,
                              processing_class=tokenizer)
    assert len(trainer.train_dataset) == 2
    read = model.provenance["data"]
    assert (read["rows"], read["kept"], read["skipped_reasons"]) == (3, 2, {"missing key 'rejected'": 1})
    assert read["rows_sha256"] is not None


def test_a_datasetdict_or_a_stream_of_raw_rows_to_train_on_is_refused_by_name(tmp_path):
    """A DatasetDict (what load_dataset returns) is no split to train on: refused naming train_dataset,
    not a KeyError from the data loader; a stream of raw rows is refused where a stream of tokenized
    pairs trains (Trainer takes an IterableDataset with max_steps), and a DatasetDict of eval sets
    evaluates each."""
    datasets = pytest.importorskip("datasets")
    from helpers import rows
    from qadapter.library.data import pairs_dataset

    model, tokenizer, args, train, heldout = training_setup(tmp_path, max_steps=1)
    splits = datasets.DatasetDict({"train": pairs_dataset(train)})
    with pytest.raises(TypeError, match=r"train_dataset must be one split of pairs .*got a DatasetDict of the splits "
                                        r"\['train'\]: pass one of them, e.g. train_dataset=data\['train'\]"):
        QAdapterTrainer(model=model, args=args, train_dataset=splits, processing_class=tokenizer)
    stream = datasets.Dataset.from_list(rows(4, seed=0)).to_iterable_dataset()
    unknown = datasets.IterableDataset.from_generator(lambda: iter(rows(4, seed=0)))  # its columns unknown
    assert unknown.column_names is None
    for name in ("train_dataset", "eval_dataset"):
        for raw in (stream, unknown):
            with pytest.raises(ValueError, match=f"{name} is a stream .* of raw preference rows .*chosen, prompt, rejected"):
                QAdapterTrainer(model=model, args=args, processing_class=tokenizer, **{name: raw})
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=pairs_dataset(train).to_iterable_dataset(),
                              eval_dataset=datasets.DatasetDict({"test": pairs_dataset(heldout)}),
                              processing_class=tokenizer)
    trainer.train()
    assert "eval_test_loss" in trainer.evaluate()


def test_a_model_init_building_on_one_base_object_trains_each_run_afresh(tmp_path):
    """Trainer calls ``model_init`` again at each ``train()`` (each run of a hyperparameter search): one
    that builds a fresh Q-Adapter on a base object it keeps gets that base back from the model of the
    run before, which the trainer lets go of first, and each run, seeded alike, trains alike."""
    import gc

    model, tokenizer, args, train, _ = training_setup(tmp_path, max_steps=2)
    base = model.base_model
    del model
    gc.collect()
    trainer = QAdapterTrainer(model_init=lambda: QAdapterModel(base, tokenizer=tokenizer, **args.model_options()),
                              args=args, train_dataset=train, processing_class=tokenizer)
    losses = [trainer.train().training_loss for _ in range(2)]
    assert losses[0] == losses[1]


def test_checkpoints_hold_the_adapter_only_and_resume_exactly(tmp_path):
    model, tokenizer, args, train, _ = training_setup(tmp_path / "full", max_steps=6)
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
    uninterrupted = lora_state(model)

    model, tokenizer, args, train, _ = training_setup(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "qadapter_config.json", "optimizer.pt"} <= files
    assert "model.safetensors" not in files  # never a copy of the frozen base
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < 1_000_000
    QAdapterModel.from_pretrained(checkpoint, fresh_base())  # config and fingerprint

    # What a run killed while writing checkpoint-6 leaves: part of its files. Trainer writes over it.
    last = tmp_path / "cut" / "checkpoint-6"
    for path in last.iterdir():
        path.unlink()
    (last / "adapter_model.safetensors").write_bytes(b"half written")
    model, tokenizer, args, train, _ = training_setup(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train(
        resume_from_checkpoint=str(checkpoint))
    resumed = lora_state(model)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-7)
    saved = lora_state(QAdapterModel.from_pretrained(last, fresh_base()))
    for name, value in uninterrupted.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-7)
    assert not list(last.glob(atomic.STAGING_PREFIX + "*"))


def test_a_run_resumed_at_its_last_step_takes_no_further_step(tmp_path):
    """A run killed after the checkpoint of its last step (while saving the final adapter) is resumed:
    it takes no step. Trainer alone, its epoch not over (8 steps each here), trained a step past
    max_steps, into a checkpoint-4 and an adapter of step 4."""
    model, tokenizer, args, train, _ = training_setup(tmp_path, max_steps=3, save_strategy="steps", save_steps=3)
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
    finished = lora_state(model)

    model, tokenizer, args, train, _ = training_setup(tmp_path, max_steps=3, save_strategy="steps", save_steps=1)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 3
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]
    for name, value in lora_state(model).items():
        assert torch.equal(value, finished[name]), name


def test_resume_refuses_a_checkpoint_that_is_not_this_adapters(tmp_path):
    """Resuming checks the checkpoint as loading does: its base fingerprint, and exactly the
    adapter's LoRA tensors (PEFT alone would load a partial or foreign set with a warning)."""
    from safetensors.torch import load_file, save_file

    model, tokenizer, args, train, _ = training_setup(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
    checkpoint = tmp_path / "checkpoint-2"

    model, tokenizer, args, train, _ = training_setup(tmp_path, max_steps=4, save_strategy="no")
    other_base = QAdapterModel(tiny_causal_lm("llama", seed=5, vocab=len(tokenizer)), tokenizer=tokenizer,
                               **args.model_options())
    with pytest.raises(AdapterLoadError, match="trained on another base model"):
        QAdapterTrainer(model=other_base, args=args, train_dataset=train, processing_class=tokenizer).train(
            resume_from_checkpoint=str(checkpoint))

    weights = load_file(checkpoint / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.0." not in k}, checkpoint / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="does not match its adapter config"):
        QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train(
            resume_from_checkpoint=str(checkpoint))


def test_resume_refuses_what_the_checkpoint_would_override_and_warns_of_what_changes_the_run(tmp_path):
    """A resumed run restores the checkpoint's optimizer and learning-rate schedule: another learning
    rate would be silently the checkpoint's, so it is refused; so is a checkpoint past max_steps and
    another LoRA rank (one line, not a size mismatch per tensor). A longer run or other data go on as
    given, with a warning, and the adapter's record says where the run resumed and what differed."""
    import json

    from helpers import rows

    def trainer(learning_rate=5e-3, max_steps=4, rows_seed=0, run=tmp_path, **options):
        model, tokenizer, args, _, _ = training_setup(run, max_steps=max_steps, save_strategy="steps",
                                                      save_steps=2, learning_rate=learning_rate, **options)
        return QAdapterTrainer(model=model, args=args, train_dataset=rows(32, seed=rows_seed),
                               processing_class=tokenizer)

    trainer(max_steps=2).train()
    with pytest.raises(ValueError, match=r"learning_rate 0\.01 \(the checkpoint's: 0\.005\) would not take effect"):
        trainer(learning_rate=1e-2).train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="at step 2, past max_steps 1"):
        trainer(max_steps=1).train(resume_from_checkpoint=True)
    (tmp_path / "checkpoint-1").mkdir()  # named, but with no state
    with pytest.raises(ValueError, match=r"checkpoint-1 is not a complete checkpoint to resume from"):
        trainer().train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    with pytest.raises(AdapterLoadError, match=r"holds a LoRA of r 8.*; this model's has r 4 \(train and resume"):
        trainer(lora_r=4).train(resume_from_checkpoint=True)
    resumed = trainer(max_steps=4, rows_seed=1, lr_scheduler_type="cosine")  # the schedule's shape is rebuilt
    with pytest.warns(UserWarning) as caught:
        resumed.train(resume_from_checkpoint=True)
    said = " ".join(str(w.message) for w in caught)
    assert "max_steps 4 (the checkpoint run: 2)" in said and "on other data than its run read" in said
    assert "lr_scheduler_type 'cosine' (the checkpoint run: 'linear')" in said
    record = json.loads((tmp_path / "checkpoint-4" / "provenance.json").read_text())
    resumed_from = json.loads(json.dumps(resumed.model.provenance["training"]["resumed_from"]))
    assert resumed_from["global_step"] == 2 and resumed_from["changed"] == {
        "max_steps": {"checkpoint": 2, "given": 4}, "lr_scheduler_type": {"checkpoint": "linear", "given": "cosine"}}
    assert resumed_from["data"]["rows_sha256"] != record["data"]["rows_sha256"]
    # A checkpoint saved without its optimizer state: the optimizer and schedule start afresh, so another
    # learning rate takes effect (said, not refused).
    trainer(max_steps=2, run=tmp_path / "model-only", save_only_model=True).train()
    with pytest.warns(UserWarning) as caught:
        trainer(learning_rate=1e-2, run=tmp_path / "model-only", save_only_model=True).train(resume_from_checkpoint=True)
    said = " ".join(str(w.message) for w in caught)
    assert "holds no optimizer state" in said and "learning_rate 0.01 (the checkpoint run: 0.005)" in said
    with pytest.raises(ValueError, match="no checkpoint to resume from at .*checkpoint-7"):
        trainer().train(resume_from_checkpoint=str(tmp_path / "checkpoint-7"))
    # Resumed at its last step, a run takes no step: its summary has no training loss or time to give.
    last = trainer(max_steps=4, rows_seed=1)
    last.train(resume_from_checkpoint=True)
    metrics = last.model.provenance["metrics"]
    assert last.state.global_step == 4 and not any(key.startswith("train_") for key in metrics)


def test_resume_with_other_chat_template_options_is_warned_of(tmp_path):
    """Other chat template options render the rest of the data otherwise than the checkpoint's steps
    saw it (as another max_length cuts it otherwise): the run goes on as given, and says so."""
    from helpers import rows

    def trainer(max_steps, **options):
        model, tokenizer, args, _, _ = training_setup(tmp_path, max_steps=max_steps, save_strategy="steps",
                                                      save_steps=2, **options)
        return QAdapterTrainer(model=model, args=args, train_dataset=rows(32, seed=0), processing_class=tokenizer)

    trainer(2).train()
    resumed = trainer(4, chat_template_kwargs={"enable_thinking": False})
    with pytest.warns(UserWarning, match=r"chat_template_kwargs \{'enable_thinking': False\} \(the checkpoint run: None\)"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.model.provenance["training"]["resumed_from"]["changed"]["chat_template_kwargs"] == {
        "checkpoint": None, "given": {"enable_thinking": False}}


def test_resuming_with_other_packing_than_the_checkpoint_run_is_said(tmp_path):
    """Packed or padded, a step's dropout draws differ: a resumed run ends with the uninterrupted run's
    adapter only as that run ran, so another padding_free is warned of, a checkpoint recorded before
    the option existed being a padded run's."""
    import json

    from helpers import rows

    def trainer(**options):
        model, tokenizer, args, _, _ = training_setup(tmp_path, max_steps=2, save_strategy="steps", save_steps=2,
                                                      **options)
        return QAdapterTrainer(model=model, args=args, train_dataset=rows(32, seed=0), processing_class=tokenizer)

    trainer().train()
    with pytest.warns(UserWarning, match=r"padding_free False \(the checkpoint run: True\)"):
        trainer(padding_free=False).train(resume_from_checkpoint=True)
    file = tmp_path / "checkpoint-2" / "provenance.json"
    record = json.loads(file.read_text())
    del record["training"]["options"]["padding_free"]
    file.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"padding_free True \(the checkpoint run: False\)"):
        trainer().train(resume_from_checkpoint=True)


def test_save_model_writes_a_loadable_adapter_and_keeps_other_files(tmp_path):
    """Trainer.save_model: the adapter, its config and the tokenizer, staged and renamed into place
    beside whatever the directory holds; a directory of other things is refused untouched."""
    model, tokenizer, args, train, _ = training_setup(tmp_path / "run", max_steps=2)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    out = tmp_path / "adapter"
    training_setup(tmp_path / "old")[0].save_pretrained(out)  # an older adapter there, and the user's files
    (out / "notes.txt").write_text("mine")
    (out / "README.md").write_text("my own model card")
    trainer.save_model(str(out))
    assert (out / "notes.txt").read_text() == "mine" and (out / "README.md").read_text() == "my own model card"
    assert {"qadapter_config.json", "tokenizer_config.json", "training_args.bin"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(atomic.STAGING_PREFIX + "*"))
    loaded = lora_state(QAdapterModel.from_pretrained(out, fresh_base()))
    for name, value in lora_state(model).items():
        torch.testing.assert_close(loaded[name], value)

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(atomic.OutputDirectoryError, match="holds no Q-Adapter adapter"):
        trainer.save_model(str(foreign))
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path, capsys):
    """With the highest held-out loss as "best" (training lowers it), the best checkpoint is an early
    one, not the last: the model ends with that checkpoint's adapter."""
    from safetensors.torch import load_file

    model, tokenizer, args, train, heldout = training_setup(
        tmp_path, max_steps=6, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, eval_dataset=heldout,
                              processing_class=tokenizer)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")
    saved = load_file(f"{best}/adapter_model.safetensors")
    state = {name.replace(".default", ""): value for name, value in lora_state(model).items()}
    assert set(saved) == set(state)
    for name, value in saved.items():
        torch.testing.assert_close(state[name], value)
    # The provenance describes the adapter the model holds: the best checkpoint's step and evaluation.
    step = int(best.rpartition("-")[2])
    training, metrics = model.provenance["training"], model.provenance["metrics"]
    assert (training["global_step"], training["adapter_step"]) == (6, step)
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    at_best = next(entry for entry in evaluations if entry["step"] == step)
    assert metrics["eval_loss"] == at_best["eval_loss"] != evaluations[-1]["eval_loss"]
    from qadapter.cli import main

    model.save_pretrained(tmp_path / "kept")
    assert main(["info", str(tmp_path / "kept")]) == 0
    assert f"training: step 6, completed True, the adapter of step {step} (the best checkpoint);" in capsys.readouterr().out


@pytest.mark.parametrize("metric, greater", [("loss/bt", False), ("eval_loss/chi2", False), ("loss", False),
                                             ("eval_heldout_loss/bt", False), ("rewards/accuracies", True),
                                             ("eval_a_rewards/margins", True)])
def test_a_loss_named_for_the_best_model_is_minimized(tmp_path, metric, greater):
    """Trainer guesses from a name ending in "loss"; the pair loss's parts (loss/bt, loss/chi2) are losses
    too (of one eval set, or of one of a dict of them)."""
    assert QAdapterConfig(output_dir=str(tmp_path), metric_for_best_model=metric).greater_is_better is greater
    assert QAdapterConfig(output_dir=str(tmp_path), metric_for_best_model=metric, greater_is_better=not greater
                          ).greater_is_better is not greater  # given, kept


@pytest.mark.parametrize("metric", ["accuracy", "eval_accuracy", "rewards", "loss/b"])
def test_a_best_model_metric_the_evaluation_does_not_log_is_refused_before_training(tmp_path, metric):
    with pytest.raises(ValueError, match=r"--metric_for_best_model must name a measure the evaluation logs.*"
                                         r"rewards/accuracies"):
        QAdapterConfig(output_dir=str(tmp_path), metric_for_best_model=metric)


@pytest.mark.parametrize("metric, sets, expected", [
    ("eval_typo_loss", {"heldout": 0, "other": 0}, "one of the eval sets heldout, other before the measure"),
    ("loss", {"heldout": 0}, "one of the eval sets heldout"),
    ("eval_heldout_loss", "one set", "no eval set"),
])
def test_a_best_model_metric_names_an_eval_set_that_is_given(tmp_path, metric, sets, expected):
    """A dict of eval sets logs eval_<set>_<measure>: a set not among them (or one named where a
    single set is given) fails when the trainer is made, not at the first evaluation after training."""
    model, _, _, train, heldout = training_setup(tmp_path)
    args = QAdapterConfig(output_dir=str(tmp_path), report_to=[], metric_for_best_model=metric)
    sets = {name: heldout for name in sets} if isinstance(sets, dict) else heldout
    with pytest.raises(ValueError, match=f"--metric_for_best_model '{metric}' must name {expected}"):
        QAdapterTrainer(model=model, args=args, train_dataset=train, eval_dataset=sets)
    for given, fine in ((sets, "eval_heldout_loss" if isinstance(sets, dict) else "loss"), (None, metric)):
        args = QAdapterConfig(output_dir=str(tmp_path), report_to=[], metric_for_best_model=fine)
        QAdapterTrainer(model=model, args=args, train_dataset=train, eval_dataset=given)


def test_float16_mixed_precision_on_a_cpu_is_refused_rather_than_ignored(tmp_path):
    """accelerate takes fp16 on a CPU and casts nothing (no autocast, no loss scaling): said, with bf16."""
    with pytest.raises(ValueError, match=r"--fp16 \(float16 mixed precision\) runs on a GPU only.*--bf16 true"):
        QAdapterConfig(output_dir=str(tmp_path), fp16=True, use_cpu=True)
    if not torch.accelerator.is_available():
        with pytest.raises(ValueError, match="--fp16"):
            QAdapterConfig(output_dir=str(tmp_path), fp16=True)
    assert QAdapterConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True).bf16


def test_deepspeed_option_without_deepspeed_names_the_extra(tmp_path, monkeypatch):
    """transformers, without DeepSpeed, fails on --deepspeed with a TypeError from inside its config class."""
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # not installed
    with pytest.raises(ModuleNotFoundError, match=r'--deepspeed needs DeepSpeed: pip install "qadapter-kernels'
                                                  r'\[deepspeed\]"'):
        QAdapterConfig(output_dir=str(tmp_path), deepspeed={"zero_optimization": {"stage": 2}})


def test_reporting_to_an_integration_not_installed_is_refused_before_loading(tmp_path):
    """Trainer fails on it only when it is made, after the model has loaded."""
    from transformers.integrations.integration_utils import get_available_reporting_integrations

    missing = next(name for name in ("wandb", "comet_ml", "neptune", "clearml")
                   if name not in get_available_reporting_integrations())
    with pytest.raises(ValueError, match=f"--report_to {missing}: not installed here"):
        QAdapterConfig(output_dir=str(tmp_path), report_to=[missing])
    # Integrations transformers never lists as installed (flyte), or hides beside another, are its to judge.
    assert QAdapterConfig(output_dir=str(tmp_path), report_to=["flyte"]).report_to == ["flyte"]


@pytest.mark.parametrize("option, value", [("label_smoothing_factor", 0.1), ("neftune_noise_alpha", 5.0),
                                           ("train_sampling_strategy", "group_by_length")])
def test_trainer_options_for_a_language_models_loss_are_refused_by_name(tmp_path, option, value):
    """Options Trainer applies to a language model's token loss or batches: silently ignored (label
    smoothing), a crash deep in Trainer (NEFTune), or a failure after loading (length grouping) before."""
    if not hasattr(QAdapterConfig, option) and option not in {f.name for f in dataclasses.fields(QAdapterConfig)}:
        pytest.skip(f"this transformers has no {option}")
    with pytest.raises(ValueError, match=rf"--{option} \(a Trainer option\) .* does not take it"):
        QAdapterConfig(output_dir=str(tmp_path), **{option: value})


def test_a_sampler_by_input_ids_lengths_is_refused_before_loading(tmp_path):
    """transformers' batch_rebalance sampler reads each example's input_ids, which pairs lack: Trainer
    failed once train() started, after the model had loaded."""
    if "batch_rebalance" not in str(dataclasses.fields(QAdapterConfig)):
        pytest.skip("this transformers has no batch_rebalance sampler")
    with pytest.raises(ValueError, match="--train_sampling_strategy batch_rebalance balances .* use random or sequential"):
        QAdapterConfig(output_dir=str(tmp_path), train_sampling_strategy="batch_rebalance")


@pytest.mark.parametrize("callback", ["compute_metrics", "compute_loss_func"])
def test_a_metrics_or_loss_function_is_refused_rather_than_never_called(tmp_path, callback):
    model, _, args, train, _ = training_setup(tmp_path)
    with pytest.raises(ValueError, match=f"{callback}: the Q-Adapter trainer computes its own loss and metrics"):
        QAdapterTrainer(model=model, args=args, train_dataset=train, **{callback: lambda *a, **k: {}})


def test_no_memory_is_pinned_without_an_accelerator(tmp_path):
    """Trainer pins the loader's memory by default; without an accelerator torch's loader then warns
    on every epoch and pins nothing, so the config does not ask for it (a GPU keeps the default)."""
    args = QAdapterConfig(output_dir=str(tmp_path), report_to=[])
    assert args.dataloader_pin_memory == torch.accelerator.is_available()
    loader = QAdapterTrainer(model=training_setup(tmp_path)[0], args=args,
                             train_dataset=[{"input_ids": [1]}]).get_train_dataloader()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        iter(loader)


def test_ddp_walks_the_graph_for_unused_parameters_only_where_a_step_can_skip_one(tmp_path):
    """Trainer asks DDP to look for unused parameters (an extra autograd walk per step, a warning from
    each process) for any model that is not a PreTrainedModel; every LoRA weight of a Q-Adapter takes
    part in every step, unless it sits on a mixture-of-experts base's routed experts. A value given
    is kept, and the caller's args are left as given (they may serve a trainer of another model)."""
    model, _, args, train, _ = training_setup(tmp_path)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train)
    # What Trainer hands DDP (earlier transformers 5 releases make the handler only as they wrap the model).
    assert trainer.args.ddp_find_unused_parameters is False and args.ddp_find_unused_parameters is None
    assert getattr(trainer.accelerator.ddp_handler, "find_unused_parameters", False) is False
    args = QAdapterConfig(output_dir=str(tmp_path), report_to=[], ddp_find_unused_parameters=True)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train)
    assert args.ddp_find_unused_parameters is True
    assert getattr(trainer.accelerator.ddp_handler, "find_unused_parameters", True) is True

    routed = torch.nn.Module()
    routed.experts = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    assert may_skip_trainable(routed)
    routed.experts.requires_grad_(False)
    assert not may_skip_trainable(routed)


def test_padding_dependent_norm_with_accumulation_warns(tmp_path):
    import warnings as w

    from qadapter.library.trainer import _warn_if_padding_dependent

    with pytest.warns(UserWarning, match="depend on how far its batch is padded"):
        _warn_if_padding_dependent("padded", 2)
    with w.catch_warnings():
        w.simplefilter("error", UserWarning)
        _warn_if_padding_dependent("mean", 2)
        _warn_if_padding_dependent("padded", 1)
        # The trainer goes by the model's norm, which computes the loss (the config's is the default here).
        model, _, _, train, _ = training_setup(tmp_path)
        model.loss = LossConfig.from_options(model.loss, reward_norm="mean")
        trainer = QAdapterTrainer(model=model, args=QAdapterConfig(output_dir=str(tmp_path), report_to=[],
                                                                   gradient_accumulation_steps=2), train_dataset=train)
    assert trainer.reward_norm == "mean" and trainer.loss_is_scaled_for_ga


def test_a_config_asking_for_options_its_model_was_not_built_with_is_refused(tmp_path):
    """The model carries its loss and LoRA settings: a config's options that it does not have were
    silently not applied (beta, the LoRA rank), or crashed (reward_norm); a model's own options under a
    config that leaves them at their defaults are the model's."""
    model, tokenizer, _, train, _ = training_setup(tmp_path)
    args = QAdapterConfig(output_dir=str(tmp_path), report_to=[], beta=0.0, lora_r=2, reward_norm="sum")
    with pytest.raises(ValueError, match=r"the config asks for beta 0\.0 \(the model's: 0\.1\), reward_norm 'sum' "
                                         r"\(the model's: 'padded'\), lora_r 2 \(the model's: 8\), which the model"):
        QAdapterTrainer(model=model, args=args, train_dataset=train)
    QAdapterTrainer(model=model, args=QAdapterConfig(output_dir=str(tmp_path), report_to=[], lora_r=8),
                    train_dataset=train)  # what the model has, said again
    for option in ({"lora_r": 0}, {"lora_dropout": 1.0}):
        name = next(iter(option))
        with pytest.raises(ValueError, match=f"--{name} must be"):
            QAdapterConfig(output_dir=str(tmp_path), **option)
        with pytest.raises(ValueError, match=f"{name} must be"):
            QAdapterModel(tiny_causal_lm("llama", vocab=len(tokenizer)), **option)


def test_raw_rows_are_rendered_with_the_models_chat_template_options(tmp_path):
    """The config's JSON text (as the command line gives it) builds the model, whose options render
    raw rows; a config asking for other options than the model's is refused as any other option."""
    from helpers import rows, tiny_thinking_tokenizer
    from qadapter.library.data import tokenize_rows

    thinking, quiet = tiny_thinking_tokenizer(), {"enable_thinking": False}
    args = QAdapterConfig(output_dir=str(tmp_path), report_to=[], chat_template_kwargs='{"enable_thinking": false}')
    assert args.chat_template_kwargs == quiet
    model = QAdapterModel(tiny_causal_lm("llama", vocab=len(thinking)), **args.model_options())
    raw = rows(4, seed=0)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=raw, processing_class=thinking)
    want, _ = tokenize_rows(raw, thinking, max_length=args.max_length, chat_template_kwargs=quiet)
    assert trainer.train_dataset == want != tokenize_rows(raw, thinking, max_length=args.max_length)[0]
    plain = QAdapterModel(tiny_causal_lm("llama", vocab=len(thinking)))
    with pytest.raises(ValueError, match=r"chat_template_kwargs \{'enable_thinking': False\} \(the model's: \{\}\)"):
        QAdapterTrainer(model=plain, args=args, train_dataset=raw, processing_class=thinking)
    with pytest.raises(ValueError, match="--chat_template_kwargs must be a JSON object"):
        QAdapterConfig(output_dir=str(tmp_path), chat_template_kwargs="{enable_thinking: false}")


def test_the_trainer_pads_with_the_models_tokenizer_where_none_is_given(tmp_path):
    """processing_class is optional where the model carries its tokenizer; with neither, said by name
    (Trainer's default collator failed deep in training with a KeyError)."""
    model, tokenizer, args, train, _ = training_setup(tmp_path, max_steps=1)
    model.tokenizer = tokenizer
    QAdapterTrainer(model=model, args=args, train_dataset=train).train()
    model.tokenizer = None
    with pytest.raises(ValueError, match=r"processing_class \(the tokenizer\) is needed to pad the pairs"):
        QAdapterTrainer(model=model, args=args, train_dataset=train)


@pytest.mark.parametrize(("reward_norm", "older_transformers"), [("mean", False), ("sum", False), ("mean", True)])
def test_accumulated_micro_batches_train_as_their_concatenation(tmp_path, reward_norm, older_transformers):
    """Two micro-batches of 2 pairs accumulated = one batch of 4 pairs: the same logged loss and the
    same LoRA weights after plain SGD steps (Trainer's num_items_in_batch carries the step's counts).
    Transformers before ``loss_is_scaled_for_ga`` decide whether to divide by ``model_accepts_loss_kwargs``."""
    runs = {}
    for micro, accumulate in ((4, 1), (2, 2)):
        model, tokenizer, args, train, _ = training_setup(tmp_path / f"{micro}", max_steps=3, optim="sgd", learning_rate=0.5,
                                                 per_device_train_batch_size=micro,
                                                 gradient_accumulation_steps=accumulate, reward_norm=reward_norm, beta=2.0)
        trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        if older_transformers:
            trainer.loss_is_scaled_for_ga = None  # Trainer's default where the attribute exists
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[micro] = (losses, lora_state(model))
    (whole_losses, whole), (acc_losses, accumulated) = runs[4], runs[2]
    assert len(whole_losses) == len(acc_losses) == 3
    torch.testing.assert_close(torch.tensor(acc_losses), torch.tensor(whole_losses), rtol=2e-5, atol=1e-6)
    assert any((whole[name] - before).abs().max() > 1e-4 for name, before in lora_state(
        training_setup(tmp_path / "init")[0]).items())  # the steps moved the weights
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=2e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("reward_norm", ["mean", "sum"])
def test_a_steps_totals_are_its_micro_batches_pairs_and_scored_tokens(tmp_path, reward_norm):
    """``get_batch_samples`` counts the pairs and scored tokens of every micro-batch of a step (counted
    here from the tokenized pairs' responses), and a step of one micro-batch, given its totals, has
    that batch's own loss: the totals are no scale of their own."""
    from qadapter.library.data import PreferenceCollator

    model, tokenizer, args, train, _ = training_setup(tmp_path, reward_norm=reward_norm, beta=2.0)
    perturb_adapter(model, seed=3)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(11)
    order = torch.randperm(len(train), generator=generator).tolist()
    groups = [[train[i] for i in order[:3]], [train[i] for i in order[3:8]]]  # micro-batches of unequal size
    batches = [collate(group) for group in groups]
    batches_out, totals = trainer.get_batch_samples(iter(batches), len(batches), torch.device("cpu"))
    assert len(batches_out) == 2
    scored = sum(len(f[f"{side}_input_ids"]) - f[f"{side}_labels"].count(-100)
                 for group in groups for f in group for side in ("chosen", "rejected"))
    assert (totals.pairs, totals.tokens) == (8, scored)
    model.eval()
    with torch.no_grad():
        for batch in batches:
            _, one = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
            alone = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
            torch.testing.assert_close(trainer.compute_loss(model, batch, num_items_in_batch=one), alone,
                                       rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("reward_norm", ["mean", "sum"])
def test_a_model_with_its_own_ignore_index_trains_as_with_the_default(tmp_path, reward_norm):
    """A model whose loss skips another label (ignore_index=-1), fed by a collator that marks unscored
    positions so, with accumulated micro-batches: the step's token counts (the exact shares' totals) and
    the logged metrics count the tokens the loss scores, so losses and LoRA weights are the default's."""
    runs = {}
    for ignore_index in (-100, -1):
        model, tokenizer, args, train, _ = training_setup(tmp_path / str(ignore_index), max_steps=2, optim="sgd",
                                                          learning_rate=0.5, per_device_train_batch_size=2,
                                                          gradient_accumulation_steps=2, reward_norm=reward_norm,
                                                          beta=2.0)
        model.loss = replace(model.loss, ignore_index=ignore_index)
        collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)

        def marked(features, ignore_index=ignore_index):
            batch = collate(features)
            batch["labels"] = batch["labels"].masked_fill(batch["labels"] == -100, ignore_index)
            return batch

        trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, data_collator=marked)
        trainer.train()
        logged = [{k: v for k, v in entry.items() if k.startswith(("loss", "rewards"))}
                  for entry in trainer.state.log_history if "loss" in entry]
        runs[ignore_index] = (logged, lora_state(model))
    (want_logs, want), (got_logs, got) = runs[-100], runs[-1]
    assert len(want_logs) == 2 and want_logs[0].keys() == got_logs[0].keys()
    for w, g in zip(want_logs, got_logs):  # float32 sums in either order: 2e-5 relative
        torch.testing.assert_close(torch.tensor(list(g.values())), torch.tensor(list(w.values())), rtol=2e-5, atol=1e-6)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=2e-5, atol=1e-6, msg=name)


def test_a_model_with_its_own_ignore_index_needs_a_collator_marking_labels_so(tmp_path):
    model, tokenizer, args, train, _ = training_setup(tmp_path)
    model.loss = replace(model.loss, ignore_index=-1)
    with pytest.raises(ValueError, match="ignore_index -1, and the pairs' collator marks unscored positions with -100"):
        QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_training_that_goes_non_finite_stops_and_keeps_the_last_checkpoint(tmp_path, poison):
    """A non-finite loss (a LoRA weight turned NaN) or a non-finite gradient (an inf gradient hook)
    at step 3 stops training with an error naming the step, before the optimizer takes it; the
    checkpoint of step 2 is whole, loads, and holds finite weights."""
    from qadapter.library.trainer import NonFiniteTrainingError
    from transformers import TrainerCallback

    model, tokenizer, args, train, _ = training_setup(tmp_path, max_steps=6, save_strategy="steps", save_steps=2)
    lora_b = next(p for n, p in model.peft_model.named_parameters() if "lora_B" in n)

    class Poison(TrainerCallback):  # once checkpoint-2 is written
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 2:
                if poison == "loss":
                    with torch.no_grad():
                        lora_b.fill_(float("nan"))
                else:
                    lora_b.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                              callbacks=[Poison()])
    what = "the loss is nan" if poison == "loss" else "a gradient is not finite"
    with pytest.raises(NonFiniteTrainingError, match=f"step 3: {what}"):
        trainer.train()
    assert not (tmp_path / "checkpoint-4").exists()
    saved = QAdapterModel.from_pretrained(tmp_path / "checkpoint-2", fresh_base())
    assert all(torch.isfinite(p).all() for n, p in saved.peft_model.named_parameters() if "lora_" in n)


def test_every_checkpoint_push_uploads_a_loadable_adapter(tmp_path, monkeypatch):
    """``push_to_hub`` with Trainer's default ``hub_strategy="every_save"``: each checkpoint's upload of
    the output folder is a whole Q-Adapter (our config with PEFT's files) whose weights are that
    checkpoint's, and the final upload the trained adapter's. No hub here: the upload is caught."""
    from concurrent.futures import Future

    import huggingface_hub

    uploads = []

    def upload_folder(self, *, repo_id, folder_path, commit_message, run_as_future=False, path_in_repo=None, **_):
        if path_in_repo is None:  # the output folder, as a repository's root
            uploads.append((commit_message, lora_state(QAdapterModel.from_pretrained(folder_path, fresh_base()))))
        if not run_as_future:
            return f"https://huggingface.co/{repo_id}/commit/0"
        done = Future()
        done.set_result(None)
        return done

    def create_repo(self, repo_id, **_):
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    # Earlier transformers 5 releases call the module's functions, bound to huggingface_hub's own HfApi
    # when imported.
    for name, caught in (("create_repo", create_repo), ("upload_folder", upload_folder)):
        monkeypatch.setattr(f"transformers.trainer.{name}", functools.partial(caught, None), raising=False)
    model, tokenizer, args, train, _ = training_setup(tmp_path, max_steps=4, save_strategy="steps", save_steps=2,
                                                      push_to_hub=True, hub_model_id="me/run")
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    trainer.save_model()
    assert [message for message, _ in uploads] == ["Training in progress, step 2", "Training in progress, step 4",
                                                   "Model save"]
    for (_, pushed), step in zip(uploads, (2, 4)):
        saved = lora_state(QAdapterModel.from_pretrained(tmp_path / f"checkpoint-{step}", fresh_base()))
        for name, value in saved.items():
            torch.testing.assert_close(pushed[name], value, rtol=0, atol=0)
    for name, value in lora_state(model).items():
        torch.testing.assert_close(uploads[-1][1][name], value, rtol=0, atol=0)


def test_evaluation_metrics_are_over_all_pairs_under_their_prefix(tmp_path):
    """Batches of unequal size average as their concatenation; ``predict`` and a named prefix get the
    reward metrics under their own prefix and leave nothing behind for the next evaluation."""
    model, tokenizer, args, _, heldout = training_setup(tmp_path, reward_norm="mean", beta=0.5)  # "padded": batch-dependent
    perturb_adapter(model, scale=0.3)
    heldout = heldout[:7]
    concatenated = QAdapterTrainer(model=model, args=replace(args, per_device_eval_batch_size=7),
                                   processing_class=tokenizer).evaluate(eval_dataset=heldout)
    trainer = QAdapterTrainer(model=model, args=replace(args, per_device_eval_batch_size=3), processing_class=tokenizer)
    alone = trainer.evaluate(eval_dataset=heldout)  # batches of 3, 3 and 1 pairs
    for key in [*METRIC_NAMES.values(), "loss"]:  # the loss too (chi2 a mean over all tokens, not batches')
        assert alone[f"eval_{key}"] == pytest.approx(concatenated[f"eval_{key}"], rel=1e-6, abs=1e-7), key
    assert alone["eval_loss"] == pytest.approx(evaluate_pairs(model, heldout, tokenizer.pad_token_id)["loss"], rel=1e-5)
    assert alone["eval_rewards/accuracies"] == preference_metrics(model, heldout, tokenizer.pad_token_id)["accuracy"]
    other = trainer.evaluate(eval_dataset=heldout[:4], metric_key_prefix="test")
    assert {f"test_{key}" for key in METRIC_NAMES.values()} <= other.keys()
    assert not any(key.startswith("eval_") for key in other)
    assert {f"test_{key}" for key in METRIC_NAMES.values()} <= trainer.predict(heldout[:4]).metrics.keys()
    again = trainer.evaluate(eval_dataset=heldout)
    for key in METRIC_NAMES.values():
        assert again[f"eval_{key}"] == pytest.approx(alone[f"eval_{key}"], rel=1e-6), key


def test_evaluate_and_predict_take_raw_rows_as_the_constructor_does(tmp_path):
    """Raw preference rows (a datasets.Dataset of prompt, chosen, rejected) given to evaluate or predict
    are tokenized with the config's lengths, as the constructor's datasets are: the same measures."""
    import datasets
    from helpers import rows
    from qadapter.library.data import tokenize_rows

    model, tokenizer, args, _, _ = training_setup(tmp_path, reward_norm="mean")
    raw = rows(6, seed=3)
    tokenized, _ = tokenize_rows(raw, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    trainer = QAdapterTrainer(model=model, args=args, processing_class=tokenizer)
    want = trainer.evaluate(eval_dataset=tokenized)
    got = trainer.evaluate(eval_dataset=datasets.Dataset.from_list(raw))
    predicted = trainer.predict(raw).metrics
    for key in METRIC_NAMES.values():
        assert got[f"eval_{key}"] == pytest.approx(want[f"eval_{key}"], rel=1e-6), key
        assert predicted[f"test_{key}"] == pytest.approx(want[f"eval_{key}"], rel=1e-6), key


def test_trainer_arguments_are_a_qadapter_config(tmp_path, monkeypatch):
    """None takes the defaults, as Trainer's does; a plain TrainingArguments lacks the loss options."""
    from transformers import TrainingArguments

    monkeypatch.chdir(tmp_path)
    model, tokenizer, _, train, _ = training_setup(tmp_path)
    defaults = QAdapterConfig(output_dir=str(tmp_path))
    assert QAdapterTrainer(model=model, processing_class=tokenizer).args.loss_config() == defaults.loss_config()
    with pytest.raises(TypeError, match="args must be a QAdapterConfig .*got TrainingArguments"):
        QAdapterTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path)), processing_class=tokenizer)


def test_evaluate_with_persistent_workers_measures_the_data_set_given(tmp_path):
    """With persistent loader workers, Trainer keeps each evaluation's loader by its eval set's name,
    and every data set given to ``evaluate`` under the one name "eval": a set given after the
    trainer's own (or a second of a dict given) was measured on the first one's loader, its measures."""
    from helpers import rows

    model, tokenizer, args, _, heldout = training_setup(tmp_path, reward_norm="mean")
    model.peft_model.eval()
    other, third = rows(6, seed=3), rows(5, seed=4)
    alone = QAdapterTrainer(model=model, args=args, processing_class=tokenizer)
    want = [alone.evaluate(heldout[:6])["eval_loss"], alone.evaluate(other)["eval_loss"],
            alone.evaluate(third)["eval_loss"]]
    workers = replace(args, dataloader_num_workers=1, dataloader_persistent_workers=True)
    trainer = QAdapterTrainer(model=model, args=workers, eval_dataset=heldout[:6], processing_class=tokenizer)
    sets = trainer.evaluate({"other": other, "third": third})
    got = [trainer.evaluate()["eval_loss"], trainer.evaluate(other)["eval_loss"], trainer.evaluate(third)["eval_loss"]]
    assert got == pytest.approx(want, rel=1e-6)
    assert [sets["eval_other_loss"], sets["eval_third_loss"]] == pytest.approx(want[1:], rel=1e-6)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want[0], rel=1e-6)  # its own set's loader, kept


def test_which_options_resuming_refuses_or_says_and_how_a_checkpoint_is_read(tmp_path):
    """:func:`resume_point` on checkpoint folders written by hand: each optimizer hyperparameter
    (learning rate, weight decay, Adam's betas and epsilon, optim_args) another than the checkpoint
    run's is refused where its optimizer state is restored, Trainer's optimizer.pt or a DeepSpeed
    engine's global_step folder; an option of the run's course is said; one of neither (how often it
    logs) is not compared; a checkpoint at max_steps itself resumes; other data is the data's hash."""
    import json

    from qadapter.library.trainer import resume_point

    def config(**options):
        return QAdapterConfig(output_dir=str(tmp_path / "run"), report_to="none", max_steps=4, **options)

    def checkpoint(name, step=2, optimizer="optimizer.pt", data=None, **options):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if optimizer:
            (folder / optimizer).mkdir()
        recorded = json.loads(json.dumps(config(**options).to_dict(), default=str))
        (folder / "provenance.json").write_text(json.dumps({"provenance_version": 1, "data": data or {},
                                                            "training": {"options": recorded}}))
        return folder

    optimizer = {"learning_rate": 1e-3, "weight_decay": 0.1, "adam_beta1": 0.8, "adam_beta2": 0.99,
                 "adam_epsilon": 1e-6, "optim_args": "amsgrad=True"}
    for name, value in optimizer.items():
        for state in ("optimizer.pt", "global_step2"):
            folder = checkpoint(f"{name}-{state}", optimizer=state, **{name: value})
            with pytest.raises(ValueError, match=f"{name} .* would not take effect"):
                resume_point(folder, config(), None)
        with warnings.catch_warnings(record=True) as caught:  # no state restored: the value given takes effect
            warnings.simplefilter("always")
            point = resume_point(checkpoint(f"{name}-model-only", optimizer=None, **{name: value}), config(), None)
        said = " ".join(str(w.message) for w in caught)
        assert "holds no optimizer state" in said and f"with {name} " in said and "goes on with the values" in said
        assert list(point["changed"]) == [name] and point["fresh_optimizer"]
    course = {"warmup_steps": 3, "seed": 7, "gradient_accumulation_steps": 2, "max_length": 64, "alpha_0": 0.5}
    folder = checkpoint("course", **course, logging_steps=7)
    with pytest.warns(UserWarning, match="the run goes on with the values given"):
        point = resume_point(folder, config(), None)
    given = config()
    assert point["changed"] == {name: {"checkpoint": value, "given": getattr(given, name)}
                                for name, value in course.items()}
    data = {"rows_sha256": "a" * 64, "source": "pairs.jsonl"}
    at_the_end = resume_point(checkpoint("end", step=4, data=data), config(), {"rows_sha256": "a" * 64})
    assert at_the_end == {"checkpoint": str(tmp_path / "end"), "global_step": 4}
    with pytest.warns(UserWarning, match=r"on other data than its run read \(pairs.jsonl\): steps 1-2"):
        point = resume_point(checkpoint("other-data", data=data), config(), {"rows_sha256": "b" * 64})
    assert point["data"] == data and "changed" not in point
