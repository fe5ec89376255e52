"""QAdapterTrainer on a tiny random model: it learns a preference, logs the preference metrics,
checkpoints only the adapter, and resumes exactly."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from conftest import tiny_causal_lm, tiny_chat_tokenizer  # noqa: E402

from qadapter.data import tokenize_rows  # noqa: E402
from qadapter.evaluate import preference_metrics  # noqa: E402
from qadapter.model import QAdapterModel  # noqa: E402
from qadapter.trainer import METRIC_NAMES, QAdapterConfig, QAdapterTrainer  # noqa: E402

WORDS = "the capital of France is Paris user assistant system hello world".split()


def rows(count: int, seed: int):
    """Prompts of random words; the chosen answer opens with "world", the rejected with "hello"
    (the untrained tiny model prefers "hello": before training, accuracy is 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        pick = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))  # noqa: E731
        body = pick(4)
        out.append({"prompt": pick(3), "chosen": f"world {body}", "rejected": f"hello {body}"})
    return out


def setup(tmp_path, **config):
    tokenizer = tiny_chat_tokenizer()
    base = tiny_causal_lm("llama", vocab=len(tokenizer))
    config = {"save_strategy": "no", "per_device_train_batch_size": 4, "learning_rate": 5e-3, **config}
    args = QAdapterConfig(output_dir=str(tmp_path), logging_steps=1, report_to=[], use_cpu=True, seed=0,
                          lora_dropout=0.0, **config)
    model = QAdapterModel(base, tokenizer=tokenizer, **args.model_options())
    train, _ = tokenize_rows(rows(32, seed=0), tokenizer, max_length=48)
    heldout, _ = tokenize_rows(rows(16, seed=1), tokenizer, max_length=48)
    return model, tokenizer, args, train, heldout


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if "lora_" in n}


def test_training_learns_the_preference_and_logs_metrics(tmp_path):
    model, tokenizer, args, train, heldout = setup(tmp_path, max_steps=24)
    before = preference_metrics(model, heldout, tokenizer.pad_token_id)
    trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    after = preference_metrics(model, heldout, tokenizer.pad_token_id)
    assert after["loss"] < before["loss"] - 0.05
    assert before["accuracy"] < 0.5 <= 0.9 <= after["accuracy"]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(name in logged[0] for name in METRIC_NAMES.values())
    assert logged[-1]["rewards/margins"] > logged[0]["rewards/margins"]


def test_checkpoints_hold_the_adapter_only_and_resume_exactly(tmp_path):
    model, tokenizer, args, train, _ = setup(tmp_path / "full", max_steps=6)
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
    uninterrupted = lora_state(model)

    model, tokenizer, args, train, _ = setup(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train()
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "qadapter_config.json", "optimizer.pt"} <= files
    assert "model.safetensors" not in files  # never a copy of the frozen base
    assert (checkpoint / "adapter_model.safetensors").stat().st_size < 1_000_000

    model, tokenizer, args, train, _ = setup(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer).train(
        resume_from_checkpoint=str(checkpoint))
    resumed = lora_state(model)
    for name, value in uninterrupted.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-7)


def test_padding_dependent_norm_with_accumulation_warns(tmp_path):
    import warnings as w

    from qadapter.trainer import QAdapterConfig, _warn_if_padding_dependent

    args = QAdapterConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2, report_to=[])
    with pytest.warns(UserWarning, match="depend on how far its batch is padded"):
        _warn_if_padding_dependent(args)
    with w.catch_warnings():
        w.simplefilter("error")
        _warn_if_padding_dependent(QAdapterConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2,
                                                  reward_norm="mean", report_to=[]))
        _warn_if_padding_dependent(QAdapterConfig(output_dir=str(tmp_path), report_to=[]))


@pytest.mark.parametrize("reward_norm", ["mean", "sum"])
def test_accumulated_micro_batches_train_as_their_concatenation(tmp_path, reward_norm):
    """Two micro-batches of 2 pairs accumulated = one batch of 4 pairs: the same logged loss and the
    same LoRA weights after plain SGD steps (Trainer's num_items_in_batch carries the step's counts)."""
    runs = {}
    for micro, accumulate in ((4, 1), (2, 2)):
        model, tokenizer, args, train, _ = setup(tmp_path / f"{micro}", max_steps=3, optim="sgd", learning_rate=0.5,
                                                 per_device_train_batch_size=micro,
                                                 gradient_accumulation_steps=accumulate, reward_norm=reward_norm, beta=2.0)
        trainer = QAdapterTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        runs[micro] = (losses, lora_state(model))
    (whole_losses, whole), (acc_losses, accumulated) = runs[4], runs[2]
    assert len(whole_losses) == len(acc_losses) == 3
    torch.testing.assert_close(torch.tensor(acc_losses), torch.tensor(whole_losses), rtol=2e-5, atol=1e-6)
    assert any((whole[name] - before).abs().max() > 1e-4 for name, before in lora_state(
        setup(tmp_path / "init")[0]).items())  # the steps moved the weights
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=2e-5, atol=1e-6, msg=name)
