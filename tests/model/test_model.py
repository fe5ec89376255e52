"""QAdapterModel: training forward without full logits, LoRA-only gradients, save/load, and
distributed training (decoding: test_generation.py)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
from helpers import (  # noqa: E402
    LargestTensor,
    building_block_loss,
    exit_worker,
    init_gloo,
    joined_batch_reference,
    left_padded_prompts,
    make_model,
    pair_batch,
    perturb_adapter,
    preference_batch,
    run_two_workers,
    shared_prompt_pairs,
    tiny_causal_lm,
)
from qadapter.library.model import AdapterLoadError, QAdapterModel  # noqa: E402

FAMILIES = ["llama", "qwen2", "mistral", "gemma"]


def test_training_step_never_allocates_full_logits():
    vocab = 1000
    model = QAdapterModel(tiny_causal_lm("llama", vocab=vocab), chunk_size=8)
    model.train()
    ids, mask, labels = preference_batch(vocab=vocab, seq=64)
    full = ids.numel() * vocab  # the largest legitimate tensors are [V, d] views and [chunk, V]
    with LargestTensor() as fused:
        model(ids, mask, labels).loss.backward()
    assert fused.largest < full // 4, (fused.largest, full)
    with LargestTensor() as control:  # the hook does see a plain forward's logits
        model.base_model(input_ids=ids, attention_mask=mask)
    assert control.largest >= full


def test_gradients_reach_only_lora_and_base_stays_bit_identical():
    model = make_model()
    model.train()
    before = {n: p.detach().clone() for n, p in model.peft_model.named_parameters() if "lora_" not in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids, mask, labels = preference_batch()
    model(ids, mask, labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable if p.shape[0] != 0)
    opt.step()
    after = dict(model.peft_model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert all(after[n].grad is None for n in before)


def test_build_train_checkpoint_save_load_and_generate_call_nothing_deprecated(tmp_path):
    """A user whose CI turns deprecation warnings into errors: the model layer's own calls into
    transformers, PEFT and torch use their current APIs. PEFT's own read of transformers' renamed
    ``is_gradient_checkpointing`` (inside get_peft_model / PeftModel) is the one warning left."""
    import warnings

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        model = make_model()
        model.train()
        model.activation_checkpointing_enable()
        ids, mask, labels = preference_batch()
        model(ids, mask, labels).loss.backward()
        model.save_pretrained(tmp_path / "adapter")
        loaded = QAdapterModel.from_pretrained(tmp_path / "adapter", tiny_causal_lm("llama"))
        prompt, prompt_mask = left_padded_prompts()
        loaded.generate(prompt, prompt_mask, max_new_tokens=2)
    ours = [f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}" for w in shown
            if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and "is_gradient_checkpointing" not in str(w.message)]
    assert ours == []


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gradient_checkpointing_gives_the_same_gradients(layout):
    """Recomputed layers see what they saw: the padded batch's mask, or the packed one's tree mask."""
    if layout == "padded":
        ids, mask, labels = preference_batch()
    else:  # shared prompts and padding: the passes run packed
        from qadapter import PreferenceCollator

        batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(4, seed=3))
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert make_model().packing()(ids, mask) is not None
    grads = []
    for checkpointing in (False, True):
        model = make_model()
        model.train()
        model.peft_model.eval()  # no LoRA dropout: the two runs must see the same function
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, mask, labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.peft_model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6)


def test_forward_output_is_the_loss_output_then_pass_tokens():
    """Written out for readers and type checkers, so kept to the loss output's fields here."""
    from qadapter.library.model import QAdapterModelOutput

    from qadapter_kernels import QAdapterLossOutput

    assert QAdapterModelOutput._fields == (*QAdapterLossOutput._fields, "pass_tokens")


def test_forward_requires_labels():
    with pytest.raises(ValueError, match="labels"):
        make_model()(torch.ones(2, 3, dtype=torch.long))


def test_rejects_heads_the_fused_loss_cannot_model():
    base = tiny_causal_lm("llama")
    base.config.logit_scale = 0.5
    with pytest.raises(ValueError, match="logit_scale"):
        QAdapterModel(base)
    with pytest.raises(ValueError, match="does not soft-cap"):
        QAdapterModel(tiny_causal_lm("llama"), logit_softcap=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping=0.5"):
        QAdapterModel(tiny_causal_lm("gemma2"), logit_softcap=30.0)


def test_gemma2_soft_capped_head():
    """The loss takes Gemma-2's final_logit_softcapping from the model: the capped logits are the
    model's own, and the chunked loss and LoRA gradients equal the reference backend's."""
    from qadapter_kernels.reference import _values

    models = {name: make_model("gemma2", backend=name, chunk_size=5) for name in ("reference", "chunked")}
    assert all(m.loss.logit_softcap == 0.5 for m in models.values())
    for model in models.values():
        model.peft_model.eval()  # no dropout: compare exact functions
    ids, mask, labels = preference_batch(batch=4, scored=10)
    base_hidden, q_hidden = models["chunked"].hidden_states(ids, mask)
    weight = models["chunked"].lm_head_weight
    q_logits, _ = _values(base_hidden, q_hidden, weight, weight, None, 1.0, 0.0, 0.5)
    own = models["chunked"].peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(q_logits, own, rtol=1e-5, atol=1e-6)
    assert (q_logits - q_hidden @ weight.T).abs().max() > 0.05  # the cap bites
    grads = {}
    for name, model in models.items():
        out = model(ids, mask, labels)
        out.loss.backward()
        grads[name] = (out.loss.detach(), {n: p.grad for n, p in model.peft_model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(grads["chunked"][0], grads["reference"][0], rtol=1e-5, atol=1e-6)
    for n, g in grads["reference"][1].items():
        torch.testing.assert_close(grads["chunked"][1][n], g, rtol=1e-4, atol=1e-6)


def test_save_load_round_trip_reproduces_generation(tmp_path):
    model = make_model()
    ids, mask = left_padded_prompts()
    expected = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "qadapter_config.json").read_text())
    assert config["loss"]["alpha_0"] == 0.01 and config["base_fingerprint"] == model.fingerprint
    loaded = QAdapterModel.from_pretrained(tmp_path / "adapter", tiny_causal_lm("llama"))
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=8, eos_token_id=[]), expected)


def test_loading_onto_another_base_fails_clearly(tmp_path):
    make_model().save_pretrained(tmp_path / "adapter")
    with pytest.raises(AdapterLoadError, match="fingerprint"):
        QAdapterModel.from_pretrained(tmp_path / "adapter", tiny_causal_lm("llama", seed=5))


def test_corrupted_files_fail_clearly(tmp_path):
    path = tmp_path / "adapter"
    make_model().save_pretrained(path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterLoadError, match="corrupted or incomplete"):
        QAdapterModel.from_pretrained(path, tiny_causal_lm("llama"))
    (path / "qadapter_config.json").write_text("{not json")
    with pytest.raises(AdapterLoadError, match="corrupted"):
        QAdapterModel.from_pretrained(path, tiny_causal_lm("llama"))
    with pytest.raises(AdapterLoadError, match="is not a saved Q-Adapter"):
        QAdapterModel.from_pretrained(tmp_path, tiny_causal_lm("llama"))


def test_an_adapter_loads_onto_its_base_in_bfloat16_and_a_float16_refusal_says_why(tmp_path):
    """The fingerprint rounds to bfloat16: a float32-trained adapter loads onto the base in bfloat16.
    Float16 rounds the weights otherwise; refused there, the message names the dtype."""
    model = make_model()
    model.save_pretrained(tmp_path / "adapter")
    QAdapterModel.from_pretrained(tmp_path / "adapter", tiny_causal_lm("llama").to(torch.bfloat16))
    with pytest.raises(AdapterLoadError, match="the same base loaded in float16 on one side and not on the other"):
        QAdapterModel.from_pretrained(tmp_path / "adapter", tiny_causal_lm("llama").to(torch.float16))


def test_interrupted_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    path = tmp_path / "adapter"
    model = make_model()
    ids, mask = left_padded_prompts()
    expected = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    model.save_pretrained(path)
    perturb_adapter(model, seed=9)

    def write_then_crash(self, directory):
        (directory / "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(QAdapterModel, "write_adapter", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind
    loaded = QAdapterModel.from_pretrained(path, tiny_causal_lm("llama"))
    assert torch.equal(loaded.generate(ids, mask, max_new_tokens=6, eos_token_id=[]), expected)


def _ddp_worker(rank, world, init_file, out_dir):
    from torch.nn.parallel import DistributedDataParallel

    init_gloo(rank, world, init_file)
    model = make_model()
    model.train()
    model.peft_model.eval()  # no dropout: compare exact functions
    ddp = DistributedDataParallel(model)  # held until the backward: its hooks average the gradients
    ddp(*pair_batch(rank)).loss.backward()
    grads = {n: p.grad for n, p in model.peft_model.named_parameters() if p.requires_grad}
    torch.save(grads, f"{out_dir}/grads{rank}.pt")
    exit_worker()


def test_ddp_two_processes_match_one_process_on_the_joined_batch(tmp_path):
    """With equal scored counts per rank, the mean of the per-rank losses is the joined loss."""
    run_two_workers(_ddp_worker, tmp_path)
    model = make_model()
    model.train()
    model.peft_model.eval()
    model(*pair_batch()).loss.backward()
    for rank in range(2):
        ddp_grads = torch.load(tmp_path / f"grads{rank}.pt")
        for name, param in model.peft_model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(ddp_grads[name], param.grad, rtol=1e-4, atol=1e-6)


def _fsdp2_worker(rank, world, init_file, out_dir):
    from torch.distributed.fsdp import fully_shard

    init_gloo(rank, world, init_file)
    peft_model = make_model().peft_model  # tied embeddings: the lm_head is sharded with the root
    peft_model.eval()
    for layer in peft_model.get_base_model().model.layers:
        fully_shard(layer)
    fully_shard(peft_model)
    assert hasattr(peft_model.get_base_model().get_output_embeddings().weight, "full_tensor")  # sharded
    loss = building_block_loss(peft_model, *pair_batch(rank))
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in peft_model.named_parameters() if p.requires_grad}
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/fsdp{rank}.pt")
    exit_worker()


def test_fsdp2_two_processes_match_one_process_on_the_joined_batch(tmp_path):
    """FSDP2 (fully_shard) shards the lm_head; the building blocks gather it, and the mean of the
    per-rank losses and the averaged LoRA gradients are the joined batch's."""
    pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
    run_two_workers(_fsdp2_worker, tmp_path)
    peft_model, loss = joined_batch_reference()
    ranks = [torch.load(tmp_path / f"fsdp{rank}.pt") for rank in range(2)]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, rtol=1e-5, atol=1e-6)
    trainable = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and set(ranks[0]["grads"]) == set(trainable)
    for name, grad in trainable.items():
        torch.testing.assert_close(ranks[0]["grads"][name], grad, rtol=1e-4, atol=1e-6)