"""The memory plan's arithmetic against hand-computed cases, its advice, and ``qadapter plan``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from qadapter.library.memory_plan import (
    GIB,
    MIB,
    ModelShape,
    PlanOptions,
    loss_chunk_bytes,
    parse_size,
    plan,
    quantized_linear_bytes,
    suggestions,
)

from qadapter_kernels.sizing import auto_chunk_size

# vocab 1000, d 64, intermediate 128, 2 layers, 4 heads and 2 KV heads of 16, tied head.
SMALL = ModelShape(vocab=1000, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16, tied=True)
OPTIONS = PlanOptions(max_length=16, pairs_per_step=1, dtype="bfloat16", lora_r=8)  # 32 tokens


def test_dense_plan_by_hand():
    parts = plan(SMALL, OPTIONS).parts
    # embeddings 1000*64*2 (tied: no second head) + 5 norms of 64 in bf16 + 2 layers of 36864 weights
    assert parts["base weights"] == 128000 + 640 + 2 * 36864 * 2
    # LoRA on q (8*(64+64)) and v (8*(64+32)) in 2 layers, 16 bytes a parameter
    assert parts["LoRA weights, gradients, AdamW state"] == 16 * 2 * (1024 + 768)
    # per token and layer (bytes): 2 norms' float32 inputs 2*4*64, q's and v's LoRA inputs in float32 and
    # their dropout masks 2*5*64, sdpa's q, k and v repeated to 4 heads of 16 and its output 4*64*2,
    # the MLP's 3*128*2 (the final norm keeps what the first layer's first norm does not); both final states
    per_layer = 2 * 4 * 64 + 2 * 5 * 64 + 4 * 64 * 2 + 3 * 128 * 2
    assert parts["activations"] == 32 * 2 * per_layer + 32 * 2 * 64 * 2
    # 32 rows of 1000 * (2 + 2 + 4) bytes, and the float32 E_p[Wq] rows
    assert parts["fused loss buffers"] == 32 * 8000 + 4 * 32 * 64
    # the packed batch's bf16 mask at its largest: fewer than 32 places in rows of at most 2 max(2 * 16, d = 64)
    assert parts["attention mask"] == 32 * 128 * 2
    assert plan(SMALL, OPTIONS, max_length=64).parts["attention mask"] == 128 * 256 * 2
    assert parts["dequantized layer (transient)"] == 0 and parts["CUDA context"] == 512 * MIB
    assert plan(SMALL, OPTIONS).peak == sum(parts.values())


def test_lora_on_fused_layers_by_hand():
    """Phi-3's fused qkv_proj (64 -> 64 + 2 * 32) and gate_up_proj (64 -> 2 * 128): the base weights as
    Llama's layout, the LoRA's as the fused layers'."""
    phi3 = replace(SMALL, fused=True)
    fused = plan(phi3, OPTIONS, target_modules=("qkv_proj", "gate_up_proj"))
    assert fused.parts["LoRA weights, gradients, AdamW state"] == 16 * 2 * 8 * ((64 + 128) + (64 + 256))
    assert fused.parts["base weights"] == plan(SMALL, OPTIONS).parts["base weights"]
    # Unnamed, the layers are the architecture's query and value projections, as training takes them.
    assert plan(phi3, OPTIONS).options.target_modules == ("qkv_proj",)
    assert plan(SMALL, OPTIONS).options.target_modules == ("q_proj", "v_proj")
    assert plan(phi3, OPTIONS).parts["LoRA weights, gradients, AdamW state"] == 16 * 2 * 8 * (64 + 128)


def test_eager_attention_keeps_its_scores_by_the_rows_length():
    """Gemma-2 runs eager attention (soft-capped scores): q, k and v, and per score the float32 softmax
    and the capped scores and probabilities in bf16 (8 bytes), over rows of max_length (the packer's
    rows keep no more); four norms a layer; its mask a float one."""
    gemma = replace(SMALL, norms=4, attention="eager", attention_softcap=True)
    padded = plan(gemma, OPTIONS, padding_free=False).parts
    per_layer = 4 * 4 * 64 + 2 * 5 * 64 + 3 * 128 * 2 + 3 * 64 * 2 + 4 * 16 * 8  # heads * max_length * 8
    assert padded["activations"] == 32 * 2 * per_layer + 32 * 2 * 64 * 2
    assert padded["attention mask"] == 32 * 2 * 16  # a float mask of each row's 16 places
    assert padded["base weights"] == plan(SMALL, OPTIONS).parts["base weights"] + 2 * 2 * 64 * 2  # 2 more norms a layer
    assert plan(gemma, OPTIONS).parts == padded


def test_a_padded_batch_keeps_sdpa_s_additive_mask_in_every_layer():
    """sdpa turns a padded batch's boolean mask into an additive one in the model dtype in every layer,
    and the backward keeps each layer's (a packed batch hands it an additive one made once)."""
    padded = plan(SMALL, OPTIONS, padding_free=False).parts
    assert padded["attention mask"] == 32 * 16 + 2 * 32 * 16 * 2  # the boolean one, then 2 layers' bf16 copies
    checkpointed = plan(SMALL, OPTIONS, padding_free=False, gradient_checkpointing=True).parts
    assert checkpointed["attention mask"] == 32 * 16 + 32 * 16 * 2  # one layer's, recomputed


def test_sdpa_keeps_an_additive_mask_per_layer_from_a_boolean_one():
    """What the plan counts for a padded batch, as torch does it: each layer's sdpa saves its own
    additive copy of the boolean mask for the backward."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=4, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config)
    ids, mask = torch.randint(0, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # padding: a mask sdpa is given
    kept = []

    def keep(saved):
        if saved.shape == (2, 1, 12, 12) and saved.is_floating_point():  # [rows, 1, length, length]
            kept.append(saved.data_ptr())
        return saved

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda saved: saved):
        model(input_ids=ids, attention_mask=mask).logits.sum()
    assert len(set(kept)) == config.num_hidden_layers


def test_a_4bit_base_runs_in_its_compute_dtype():
    """A 4-bit base loads its dense parts (embeddings, norms) in the compute dtype and runs in it."""
    bf16 = plan(SMALL, OPTIONS, quantization="4bit").parts
    fp32 = plan(SMALL, OPTIONS, quantization="4bit", compute_dtype="float32").parts
    assert fp32["base weights"] - bf16["base weights"] == (1000 + 5) * 64 * 2
    assert fp32["activations"] > bf16["activations"]


def test_the_plan_command_takes_the_layers_the_architecture_has(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from qadapter.cli import main

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000)
    transformers.Phi3Config(pad_token_id=0, **small).save_pretrained(tmp_path / "phi3")
    transformers.LlamaConfig(**small).save_pretrained(tmp_path / "llama")
    assert main(["plan", "--model", str(tmp_path / "phi3")]) == 0
    assert "LoRA r=8 on qkv_proj" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", str(tmp_path / "llama"), "--lora-target-modules", "qkv_proj"])
    assert exc.value.code == 2 and "qkv_proj is not a linear layer of this architecture" in capsys.readouterr().err


def test_the_architecture_decides_norms_and_attention():
    pytest.importorskip("transformers")
    import transformers

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000)
    gemma = ModelShape.from_config(transformers.Gemma2Config(head_dim=16, **small))
    llama = ModelShape.from_config(transformers.LlamaConfig(**small))
    # Gemma-2 attends eagerly where its transformers release gives it no sdpa (later 5.x releases).
    gemma_attention = "sdpa" if transformers.Gemma2ForCausalLM._supports_sdpa else "eager"
    assert (gemma.norms, gemma.attention, gemma.attention_softcap) == (4, gemma_attention, True)
    assert (llama.norms, llama.attention, llama.attention_softcap) == (2, "sdpa", False)
    as_dict = ModelShape.from_config(transformers.Gemma2Config(head_dim=16, **small).to_dict())
    assert (as_dict.norms, as_dict.attention) == (4, "eager")  # a dict config, too


def test_gradient_checkpointing_keeps_layer_inputs_and_one_layer():
    parts = plan(SMALL, OPTIONS, gradient_checkpointing=True).parts
    per_layer = 2 * 4 * 64 + 2 * 5 * 64 + 4 * 64 * 2 + 3 * 128 * 2
    assert parts["activations"] == 32 * (2 * 64 * 2 + per_layer) + 32 * 2 * 64 * 2


def test_quantized_weights_by_hand():
    # NF4 with double quantization: n/2 codes, an int8 scale per 64, a float32 per 256 blocks.
    assert quantized_linear_bytes(64, 64, "4bit", 2) == 2048 + 64 + 4
    assert quantized_linear_bytes(64, 64, "4bit", 2, double_quant=False) == 2048 + 4 * 64
    assert quantized_linear_bytes(64, 64, "8bit", 2) == 4096 + 4 * 64  # a float32 scale per output row
    four = plan(SMALL, OPTIONS, quantization="4bit").parts
    assert four["base weights"] == 128000 + 640 + 2 * (2 * 2116 + 2 * 1060 + 3 * 4228)
    assert four["dequantized layer (transient)"] == 64 * 128 * 2
    eight = plan(SMALL, OPTIONS, quantization="8bit").parts
    assert eight["base weights"] == 128000 + 640 + 2 * (2 * 4352 + 2 * 2176 + 2 * 8704 + 8448)
    # A float32 compute dtype dequantizes the largest layer to float32.
    assert plan(SMALL, OPTIONS, quantization="4bit", compute_dtype="float32").parts[
        "dequantized layer (transient)"] == 64 * 128 * 4


def test_plan_options_of_a_quantization_as_loading_takes_it():
    assert PlanOptions.of(None, dtype="float16") == PlanOptions(dtype="float16")
    assert PlanOptions.of("8bit", max_length=7) == PlanOptions(quantization="8bit", max_length=7)
    assert PlanOptions.of("4bit", dtype="float16") == PlanOptions(quantization="4bit", dtype="float16",
                                                                  compute_dtype="float16")
    assert PlanOptions.of({"method": "nf4", "double_quant": False, "compute_dtype": "float32"}) == PlanOptions(
        quantization="4bit", double_quant=False, compute_dtype="float32")


def test_loss_buffers_follow_the_kernels_sizing():
    for tokens, vocab in ((4096, 151936), (64, 32000), (100000, 256000)):
        per_row = vocab * (2 * 2 + 4)
        chunk = auto_chunk_size(tokens, vocab, torch.bfloat16, torch.device("cuda"), 2**30, widened=False)
        assert loss_chunk_bytes(tokens, vocab, torch.bfloat16) == chunk * per_row <= 2**30


def test_a_7b_base_in_4bit_is_about_3_6_gib():
    llama7b = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32, "tie_word_embeddings": False}
    assert 3.4 * GIB < plan(llama7b, quantization="4bit").parts["base weights"] < 3.8 * GIB
    assert 12.4 * GIB < plan(llama7b).parts["base weights"] < 12.7 * GIB  # 6.74e9 weights in bf16


def test_advice_makes_the_plan_fit():
    llama7b = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": 32}
    options = PlanOptions(max_length=512, pairs_per_step=4)
    gpu = 12 * GIB
    assert not plan(llama7b, options).fits(gpu)
    # Checkpointing and 4-bit together let the 4 pairs given fit: the advice names the changes only.
    assert suggestions(llama7b, options, gpu) == ["--gradient-checkpointing --load-in-4bit"]
    assert plan(llama7b, options, gradient_checkpointing=True, quantization="4bit").fits(gpu)
    advice = suggestions(llama7b, options, 6 * GIB)[-1]
    assert advice.startswith("--gradient-checkpointing --load-in-4bit --pairs-per-step 2 ")
    assert plan(llama7b, options, gradient_checkpointing=True, quantization="4bit", pairs_per_step=2).fits(6 * GIB)
    assert suggestions(llama7b, replace(options, gradient_checkpointing=True), gpu) == ["--load-in-4bit"]
    # In train's words too: fewer pairs a step, the same pairs an update.
    assert ("--pairs-per-step 2 (train: --per_device_train_batch_size 2 --gradient_accumulation_steps 2, the same "
            "4 pairs an update)") in advice
    eight_bit = replace(options, gradient_checkpointing=True, quantization="8bit")
    assert "--load-in-4bit (instead of --load-in-8bit)" in suggestions(llama7b, eight_bit, 8 * GIB)
    small_gpu = plan(SMALL, OPTIONS).peak - 1
    assert "--gradient-checkpointing" in suggestions(SMALL, OPTIONS, small_gpu)


@pytest.mark.parametrize("text, size", [("12GiB", 12 * GIB), ("12G", 12 * GIB), ("24GB", 24 * 10**9),
                                        ("800MiB", 800 * MIB), ("16", 16 * GIB), ("1.5GiB", int(1.5 * GIB))])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_bad_sizes_and_options_are_refused():
    for text in ("twelve", "12iB", "", "GiB"):  # "12iB" is not 12 bytes
        with pytest.raises(ValueError, match="memory size"):
            parse_size(text)
    assert parse_size("12B") == 12 and parse_size("0") == 0
    with pytest.raises(ValueError, match="quantization"):
        PlanOptions(quantization="3bit")
    with pytest.raises(ValueError, match="compute_dtype"):
        PlanOptions(quantization="4bit", compute_dtype="int8")


def test_options_as_a_caller_passes_them_plan_as_the_plain_ones():
    """numpy and torch counts, a torch.dtype and a list or generator of layers are the plain values."""
    import numpy as np

    given = PlanOptions(max_length=np.int64(16), pairs_per_step=torch.tensor(1), dtype=torch.bfloat16,
                        lora_r=np.int32(8), target_modules=(name for name in ["q_proj", "v_proj"]))
    assert given == replace(OPTIONS, target_modules=("q_proj", "v_proj"))
    assert type(given.max_length) is int and plan(SMALL, given).peak == plan(SMALL, OPTIONS).peak


@pytest.mark.parametrize(("options", "exc", "fragment"), [
    pytest.param(dict(max_length=True), TypeError, "max_length must be an integer; got True", id="bool-count"),
    pytest.param(dict(pairs_per_step=2.0), TypeError, "pairs_per_step must be an integer; got 2.0", id="float-count"),
    pytest.param(dict(gradient_checkpointing="false"), TypeError, "gradient_checkpointing must be True or False",
                 id="str-flag"),
    pytest.param(dict(padding_free=None), TypeError, "padding_free must be True or False", id="none-flag"),
    pytest.param(dict(target_modules="q_proj"), TypeError, "target_modules must be a list of layer names",
                 id="str-targets"),
    pytest.param(dict(target_modules=3), TypeError, "target_modules must be a list of layer names", id="int-targets"),
])
def test_options_of_another_type_are_refused_naming_them(options, exc, fragment):
    """Not planned as what they happen to stand for: True as one token, "false" as checkpointing on."""
    with pytest.raises(exc, match=fragment):
        PlanOptions(**options)
    with pytest.raises(TypeError, match="options must be a PlanOptions"):
        plan(SMALL, {"max_length": 16})


def test_plan_command_on_a_local_config(tmp_path, capsys):
    pytest.importorskip("transformers")
    from helpers import tiny_causal_lm
    from qadapter.cli import main

    tiny_causal_lm("llama", hidden=64).config.save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--gpu-memory", "12GiB", "--load-in-4bit"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "fits in 12.00 GiB" in out and "NF4 4-bit (double quantization), compute bfloat16" in out
    assert main(["plan", "--model", str(tmp_path), "--load-in-4bit", "--compute-dtype", "float32"]) == 0
    assert "compute float32" in capsys.readouterr().out
    assert main(["plan", "--model", str(tmp_path), "--gpu-memory", "300MiB", "--max-length", "4096"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "no change tried here makes it fit" in out  # the CUDA context alone is 512 MiB
    assert main(["plan", "--model", str(tmp_path), "--padded"]) == 0
    assert "(padded)" in capsys.readouterr().out
    for argv in (["--gpu-memory", "lots"], ["--gpu-memory", "0"], ["--gpu-memory", ""], ["--compute-dtype", "float32"],
                 ["--load-in-4bit", "--load-in-8bit"]):
        with pytest.raises(SystemExit) as exc:
            main(["plan", "--model", str(tmp_path), *argv])
        assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--compute-dtype applies with --load-in-4bit" in err and "--gpu-memory must be above 0; got '0'" in err
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", str(tmp_path / "absent")])
    assert exc.value.code == 2 and f"no model folder at {tmp_path / 'absent'}" in capsys.readouterr().err


def test_llm_int8_scales_one_float32_per_output_row_of_a_non_square_layer():
    # SMALL's layers sum as many inputs as outputs (5 * 64 + 64 + 128 = 2 * 64 + 2 * 32 + 2 * 128 + 64), so
    # its 8-bit plan alone cannot tell a scale per output row from one per input row: a layer 64 -> 32 and
    # one 128 -> 64 can (a byte a weight, then 4 bytes a row of the output).
    assert quantized_linear_bytes(64, 32, "8bit", 2) == 64 * 32 + 4 * 32
    assert quantized_linear_bytes(128, 64, "8bit", 2) == 128 * 64 + 4 * 64


def test_eager_attention_without_a_soft_cap_keeps_two_copies_of_its_scores():
    """A model told to run eager attention without a soft cap keeps per score the float32 softmax and
    the probabilities in bf16 (6 bytes a head), not the capped scores besides."""
    eager = replace(SMALL, attention="eager")
    parts = plan(eager, OPTIONS, padding_free=False).parts
    # 2 norms' float32 inputs, q's and v's LoRA inputs and masks, the MLP's three, q, k and v (no output kept),
    # and 4 heads * 16 places * (4 + 2) bytes of scores.
    per_layer = 2 * 4 * 64 + 2 * 5 * 64 + 3 * 128 * 2 + 3 * 64 * 2 + 4 * 16 * 6
    assert parts["activations"] == 32 * 2 * per_layer + 32 * 2 * 64 * 2


def test_advice_of_fewer_pairs_keeps_at_least_the_pairs_an_update():
    """7 pairs a step halve to 3, which take ceil(7 / 3) = 3 accumulation steps: 9 pairs an update, never
    fewer than the 7 given (7 // 3 = 2 steps would make 6)."""
    options = replace(OPTIONS, pairs_per_step=7)
    gpu = plan(SMALL, options, pairs_per_step=3).peak
    assert not plan(SMALL, options).fits(gpu)
    assert ("--pairs-per-step 3 (train: --per_device_train_batch_size 3 --gradient_accumulation_steps 3, the same "
            "9 pairs an update)") in suggestions(SMALL, options, gpu)


def test_advice_offers_sequences_as_short_as_64_tokens():
    options = replace(OPTIONS, max_length=128)
    gpu = plan(SMALL, options, max_length=64).peak
    assert not plan(SMALL, options).fits(gpu)
    assert "--max-length 64 (train: --max_length 64)" in suggestions(SMALL, options, gpu)
