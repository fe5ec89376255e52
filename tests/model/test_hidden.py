"""frozen_and_adapter_hidden on the causal LM families people fine-tune: the two passes' hidden states
give exactly the frozen and the adapter model's logits, without the logits being computed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
import transformers  # noqa: E402
from helpers import tiny_causal_lm  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from qadapter import HiddenStates, frozen_and_adapter_hidden, head_softcap  # noqa: E402

from qadapter_kernels import qadapter_loss  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2, bos_token_id=1, pad_token_id=0)
# The families conftest.tiny_causal_lm does not build.
MORE_FAMILIES = {
    "qwen3": lambda: transformers.Qwen3Config(head_dim=8, tie_word_embeddings=False, **COMMON),
    "phi3": lambda: transformers.Phi3Config(tie_word_embeddings=False, **COMMON),
    "olmo": lambda: transformers.OlmoConfig(tie_word_embeddings=False, **COMMON),
}
FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3", "olmo"]
TARGETS = {"phi3": ["qkv_proj"]}  # Phi-3 fuses q, k and v into one projection


def causal_lm(family: str):
    if family not in MORE_FAMILIES:
        return tiny_causal_lm(family, vocab=VOCAB)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(MORE_FAMILIES[family]()).float().eval()


def peft_lm(family: str):
    """A LoRA'd model whose adapter is not the identity (B != 0), in eval mode (no dropout)."""
    targets = TARGETS.get(family, ["q_proj", "v_proj"])
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=targets)
    model = get_peft_model(causal_lm(family), config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return model.eval()


def batch(rows=4, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    return ids, mask, labels


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_give_the_frozen_and_the_adapter_logits(family):
    model = peft_lm(family)
    ids, mask, labels = batch()
    cap = head_softcap(model.get_base_model())  # Gemma-2 soft-caps its logits
    assert (cap is not None) == (family == "gemma2")
    hidden = frozen_and_adapter_hidden(model, ids, mask, logit_softcap=cap)
    assert isinstance(hidden, HiddenStates)
    assert hidden.weight is model.get_base_model().get_output_embeddings().weight
    assert not hidden.base_hidden.requires_grad and hidden.q_hidden.requires_grad
    with torch.no_grad():
        adapter_logits = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            frozen_logits = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(adapter_logits, frozen_logits, atol=1e-3)  # the adapter does change the model
    def logits(h):
        return h @ hidden.weight.T if cap is None else cap * torch.tanh(h @ hidden.weight.T / cap)

    torch.testing.assert_close(logits(hidden.base_hidden), frozen_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(hidden.q_hidden.detach()), adapter_logits, rtol=1e-5, atol=1e-5)

    qadapter_loss(*hidden, labels, logit_softcap=cap).loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in name for name in grads)
    assert all(bool(g.abs().sum() > 0) for g in grads.values())


class Wrapper(nn.Module):
    """What DDP, FSDP and DeepSpeed look like from outside: the model as ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.module(*args, **kwargs)


def test_both_passes_go_through_a_wrapper():
    model = peft_lm("llama")
    ids, mask, _ = batch()
    wrapped = Wrapper(model)
    hidden = frozen_and_adapter_hidden(wrapped, ids, mask)
    # The two passes, and the packing probe's four (the batch packed, then each of its three sequences
    # alone), once per model: DDP sees them too.
    assert wrapped.calls == 6
    hidden = frozen_and_adapter_hidden(wrapped, ids, mask)
    assert wrapped.calls == 8
    direct = frozen_and_adapter_hidden(model, ids, mask)
    assert torch.equal(hidden.base_hidden, direct.base_hidden) and torch.equal(hidden.q_hidden, direct.q_hidden)


def test_refuses_what_it_cannot_serve():
    ids, mask, _ = batch()
    with pytest.raises(TypeError, match="model must be a peft.PeftModel"):
        frozen_and_adapter_hidden(causal_lm("llama"), ids, mask)
    model = peft_lm("llama")
    model.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30\): pass logit_softcap=30"):
        frozen_and_adapter_hidden(model, ids, mask)
    assert frozen_and_adapter_hidden(model, ids, mask, logit_softcap=30.0).weight.shape[0] == 97


def test_refuses_a_quantized_head():
    """The fused loss multiplies hidden states by the head's dense weight: an integer (quantized)
    weight is refused by name, with the way to keep the head dense."""
    ids, mask, _ = batch()
    model = peft_lm("llama")
    head = model.get_base_model().get_output_embeddings()
    head.weight = torch.nn.Parameter(torch.zeros(head.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"dense weight; got a torch.int8 one .*llm_int8_skip_modules"):
        frozen_and_adapter_hidden(model, ids, mask)


def test_a_soft_cap_of_zero_is_none():
    """``final_logit_softcapping=0`` caps nothing (a config's way of turning it off): no cap is asked
    of the caller, and the states give the model's uncapped logits."""
    model = peft_lm("llama")
    model.get_base_model().config.final_logit_softcapping = 0
    assert head_softcap(model.get_base_model()) is None
    ids, mask, _ = batch()
    hidden = frozen_and_adapter_hidden(model, ids, mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hidden.q_hidden.detach() @ hidden.weight.T, logits, rtol=1e-5, atol=1e-5)


def test_packing_is_probed_again_when_the_attention_changes():
    """The packing probe runs once per model and attention implementation: a model switched to another
    attention after its first step is probed again (that one may not keep packed sequences apart)."""
    model = peft_lm("llama")
    ids, mask, _ = batch()
    wrapped = Wrapper(model)
    frozen_and_adapter_hidden(wrapped, ids, mask)
    frozen_and_adapter_hidden(wrapped, ids, mask)
    assert wrapped.calls == 6 + 2  # the probe's four forwards once, then two per call
    attention = model.get_base_model().config._attn_implementation
    model.get_base_model().config._attn_implementation = "eager" if attention != "eager" else "sdpa"
    frozen_and_adapter_hidden(wrapped, ids, mask)
    assert wrapped.calls == 8 + 6
    frozen_and_adapter_hidden(wrapped, ids, mask)
    assert wrapped.calls == 14 + 2


def test_the_tokens_each_pass_ran():
    """Unpacked, a pass runs the whole padded batch (B * T, padding included), not only its attended
    tokens."""
    from qadapter.library.hidden import level_hidden

    model = peft_lm("llama")
    ids, mask, _ = batch()
    assert int(mask.sum()) < ids.numel()
    assert level_hidden(model, ids, mask, padding_free=False).tokens == ids.numel()
