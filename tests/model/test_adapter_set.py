"""Many adapters over one frozen base (AdapterSet): each row of a mixed batch decodes exactly its own
adapter's policy (or the base's), whatever the other rows name; loading and unloading by name, with
the checks a single adapter's loading makes."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
from helpers import left_padded_prompts, save_perturbed_adapters, save_tiny_base  # noqa: E402
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.library.model import AdapterLoadError, QAdapterModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

# Ranks, target modules and temperatures differ, so every part of the bank's layout is exercised.
ADAPTERS = {
    "terse": dict(alpha_tilde=0.8, alpha_0=0.5),
    "formal": dict(lora_r=4, target_modules=("q_proj", "v_proj", "o_proj"), alpha_tilde=1.2, alpha_0=1.0),
    "kind": dict(lora_r=16, lora_alpha=8, target_modules=("k_proj", "down_proj"), alpha_tilde=0.5, alpha_0=0.2),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base on disk and three adapters trained on it (trained-looking), name -> directory."""
    root = tmp_path_factory.mktemp("adapter_set")
    vocab = len(save_tiny_base(root / "base"))
    return root, vocab, save_perturbed_adapters(root, ADAPTERS, root / "base")


@pytest.fixture(scope="module")
def solo(saved):
    """Each adapter loaded alone, and the plain base: what each row must equal."""
    root, _, paths = saved
    models = {name: QAdapterModel.from_pretrained(path).eval() for name, path in paths.items()}
    models[None] = AutoModelForCausalLM.from_pretrained(root / "base").eval()
    return models


def next_token_logprobs(policy, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return policy(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[:, -1]


def solo_logprobs(model, ids, mask):
    if isinstance(model, QAdapterModel):
        return next_token_logprobs(model.policy, ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def set_logprobs(adapter_set, ids, mask, names):
    """Each row's next-token log-probs (a base row's scores are the base's logits: normalized here)."""
    adapter_set.rows.assignment = tuple(None if n is None else adapter_set.names.index(n) for n in names)
    return next_token_logprobs(adapter_set._policy, ids, mask).log_softmax(-1)


def test_each_row_gets_its_own_adapters_policy(saved, solo):
    _, vocab, paths = saved
    adapter_set = AdapterSet.from_pretrained(paths)
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(7, 4, 9, 5, 6))
    names = ["terse", None, "formal", "kind", "terse"]
    got = set_logprobs(adapter_set, ids, mask, names)
    for row, name in enumerate(names):
        want = solo_logprobs(solo[name], ids[row:row + 1], mask[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], want, rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")
    # The policies differ from each other, so a row that took another's adapter would be caught.
    assert (got[0] - got[2]).abs().max() > 1e-2 and (got[2] - got[3]).abs().max() > 1e-2


@pytest.mark.parametrize("names", [["formal", "formal"], ["kind", None], [None, None], ["terse", "formal", "kind"]])
def test_a_batch_runs_only_the_bank_columns_of_the_adapters_it_names(saved, solo, names):
    """Loaded adapters a batch does not name cost it nothing: each bank layer's down-projection runs
    the blocks of the named adapters that adapt that layer (the layer's whole bank where every one is
    named), and each row is still its own adapter's policy."""
    from qadapter.library.adapter_set import BANK

    _, vocab, paths = saved
    adapter_set = AdapterSet.from_pretrained(paths)
    widths = []
    layer = adapter_set.peft_model.base_model.model.model.layers[0].self_attn.q_proj
    layer.lora_A[BANK].register_forward_hook(lambda module, args, out: widths.append(out.shape[-1]))
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(5, 3, 6)[:len(names)])
    got = set_logprobs(adapter_set, ids, mask, names)
    ranks = {"terse": 8, "formal": 4, "kind": 0}  # kind adapts no q_proj: the layer's bank holds no block of it
    assert widths == [sum(ranks[n] for n in set(names) - {None})]
    for row, name in enumerate(names):
        want = solo_logprobs(solo[name], ids[row:row + 1], mask[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], want, rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")


@pytest.mark.parametrize("penalty", [{}, {"repetition_penalty": 1.5}])
def test_greedy_rows_equal_each_adapters_solo_decoding(saved, solo, penalty):
    """A repetition penalty is not shift-invariant: a base row gives generate the base's own logits,
    as the base alone does, and an adapter row its policy's log-probs, as the adapter alone does."""
    _, vocab, paths = saved
    adapter_set = AdapterSet.from_pretrained(paths)
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(7, 4, 9, 5), seed=3)
    names = ["kind", "terse", None, "formal"]
    options = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=0, **penalty)
    # Two samples per prompt at top_k=1 (greedy): the row plan follows the repeated rows.
    out = adapter_set.generate(ids, mask, adapters=names, num_return_sequences=2, do_sample=True, top_k=1, **options)
    for row, name in enumerate(names):
        one = (ids[row:row + 1], mask[row:row + 1])
        if name is None:
            want = solo[None].generate(one[0], attention_mask=one[1], do_sample=False, **options)
        else:
            want = solo[name].generate(*one, **options)
        assert torch.equal(out[2 * row], want[0]) and torch.equal(out[2 * row + 1], want[0]), f"row {row} ({name})"


def test_compiled_mixed_batch_matches_eager(saved):
    """The compiled decode step (terse loaded, not named: the bank's selection gathered in the graph)."""
    _, vocab, paths = saved
    adapter_set = AdapterSet.from_pretrained(paths)
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(7, 4, 9))
    names = ["formal", "kind", None]
    options = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    eager = adapter_set.generate(ids, mask, adapters=names, compiled=False, **options)
    assert torch.equal(adapter_set.generate(ids, mask, adapters=names, compiled=True, **options), eager)


def test_unload_and_load_keep_the_other_rows_policies(saved, solo):
    _, vocab, paths = saved
    adapter_set = AdapterSet.from_pretrained(paths)
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(7, 4, 9))
    names = ["terse", "kind", None]
    before = set_logprobs(adapter_set, ids, mask, names)
    adapter_set.unload("formal")
    assert adapter_set.names == ["terse", "kind"]
    torch.testing.assert_close(set_logprobs(adapter_set, ids, mask, names), before, rtol=1e-5, atol=1e-6)
    adapter_set.load("formal-again", paths["formal"])
    got = set_logprobs(adapter_set, ids, mask, ["formal-again", "kind", None])
    torch.testing.assert_close(got[:1], solo_logprobs(solo["formal"], ids[:1], mask[:1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1:], before[1:], rtol=1e-5, atol=1e-6)
    # The same files under a second name share the bank's LoRA, which stays while either is loaded.
    adapter_set.load("kind.v1", paths["kind"])
    assert len(adapter_set.loras) == 3
    adapter_set.unload("kind")
    torch.testing.assert_close(set_logprobs(adapter_set, ids, mask, ["terse", "kind.v1", None]), before,
                               rtol=1e-5, atol=1e-6)


def test_adapters_of_another_base_or_bad_names_are_refused(saved, tmp_path):
    _, vocab, paths = saved
    adapter_set = AdapterSet.from_pretrained({"terse": paths["terse"]})
    other_base = AutoModelForCausalLM.from_pretrained(saved[0] / "base")
    with torch.no_grad():
        other_base.get_input_embeddings().weight.add_(1.0)  # another base
    QAdapterModel(other_base).save_pretrained(tmp_path / "other")
    base_named = f"than the base loaded for the first adapter, 'terse': {str(saved[0] / 'base')!r} (fingerprint "
    with pytest.raises(AdapterLoadError, match="another base") as refused:
        adapter_set.load("other", tmp_path / "other")
    assert base_named in str(refused.value)  # no base was given: which one was loaded, and for which adapter
    with pytest.raises(AdapterLoadError, match="another base") as refused:
        AdapterSet.from_pretrained({"terse": paths["terse"], "other": tmp_path / "other"})
    assert base_named in str(refused.value)
    with pytest.raises(ValueError, match="loaded already"):
        adapter_set.load("terse", paths["formal"])
    with pytest.raises(ValueError, match="name must be"):
        adapter_set.load("", paths["formal"])
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        adapter_set.unload("nope")
    assert adapter_set.names == ["terse"]  # a refused load leaves the set as it was
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(7, 4))
    with pytest.raises(ValueError, match=r"not loaded.*\['terse'\]"):
        adapter_set.generate(ids, mask, adapters=["terse", "formal"], max_new_tokens=2)
    with pytest.raises(ValueError, match="one adapter .* per row"):
        adapter_set.generate(ids, mask, adapters=["terse"], max_new_tokens=2)
    with pytest.raises(ValueError, match="one adapter .* per row"):
        adapter_set.generate(ids, mask, adapters="terse", max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one"):
        AdapterSet.from_pretrained({})


def test_a_load_refused_after_peft_read_it_leaves_nothing_behind(saved, tmp_path):
    """Weights that do not match their config are refused once PEFT has added the LoRA's layers: a
    server retrying such a folder (each request for it, in an adapter directory) must not keep them."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, _, paths = saved
    shutil.copytree(paths["formal"], tmp_path / "extra")
    state = load_file(tmp_path / "extra" / "adapter_model.safetensors")
    state["base_model.model.extra.lora_A.weight"] = torch.zeros(4, 2)
    save_file(state, tmp_path / "extra" / "adapter_model.safetensors")
    adapter_set = AdapterSet.from_pretrained({"terse": paths["terse"]})
    for _ in range(3):
        with pytest.raises(AdapterLoadError, match="does not match its adapter config"):
            adapter_set.load("extra", tmp_path / "extra")
    assert list(adapter_set.peft_model.peft_config) == adapter_set.loras == ["lora1"]
    held = {re.search(r"\.lora_[AB]\.([^.]+)\.", name)[1] for name, _ in adapter_set.peft_model.named_parameters()
            if ".lora_" in name}
    assert held == {"lora1", "qadapter_bank"}  # the bank's own, over the adapters served


@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_rows_match_solo_policies_on_other_families(family, tmp_path):
    """An untied head (Qwen2), and a soft-capped head with sliding-window layers (Gemma-2)."""
    from helpers import tiny_causal_lm

    paths = save_perturbed_adapters(tmp_path, {"a": dict(alpha_tilde=0.7), "b": dict(lora_r=4, alpha_0=1.3)},
                                    lambda: tiny_causal_lm(family))
    adapter_set = AdapterSet.from_pretrained(paths, base_model=tiny_causal_lm(family))
    ids, mask = left_padded_prompts(lengths=(7, 4, 9))
    names = ["b", None, "a"]
    got = set_logprobs(adapter_set, ids, mask, names)
    for row, name in enumerate(names):
        one = (ids[row:row + 1], mask[row:row + 1])
        solo = tiny_causal_lm(family) if name is None else QAdapterModel.from_pretrained(paths[name], tiny_causal_lm(family))
        torch.testing.assert_close(got[row:row + 1], solo_logprobs(solo.eval(), *one), rtol=1e-5, atol=1e-5)

    def solo_of(name):  # Gemma-2's soft cap must reach the echoed prompt's scores too
        model = tiny_causal_lm(family) if name is None else QAdapterModel.from_pretrained(paths[name], tiny_causal_lm(family))
        return model.eval()

    check_read_prompts(adapter_set, solo_of, ids, mask, names, [2, 1, 3])


def solo_every_position(model, ids, mask):
    """``[B, T, V]``: the whole prompt's log-probs under a solo model (what echoing a prompt reports)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        if isinstance(model, QAdapterModel):
            return model.policy(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        return torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float(), -1)


def check_read_prompts(adapter_set, solo_of, ids, mask, names, top):
    """``read_prompts`` against each row's solo model over the whole prompt; the forward forms the last
    position's logits only."""
    from transformers import DynamicCache

    head = adapter_set.base_model.get_output_embeddings()
    formed = []
    hook = head.register_forward_hook(lambda module, args, output: formed.append(output.shape[1]))
    try:
        logprobs, scores = adapter_set.read_prompts(ids, mask, names, DynamicCache(), top=top)
    finally:
        hook.remove()
    assert formed == [1]  # no [T, V] logits
    for row, (name, k) in enumerate(zip(names, top)):
        real = mask[row].bool()
        whole = solo_every_position(solo_of(name), ids[row:row + 1, real], mask[row:row + 1, real])[0]
        torch.testing.assert_close(logprobs[row].log_softmax(-1), whole[-1], rtol=1e-5, atol=1e-5,
                                   msg=f"row {row} ({name})")  # a base row's scores are its logits
        if k is None:
            assert scores[row] is None
            continue
        prompt = ids[row, real]
        want = whole[:-1].gather(1, prompt[1:, None])[:, 0]
        torch.testing.assert_close(scores[row].combined, want, rtol=1e-5, atol=1e-5, msg=f"row {row} ({name})")
        torch.testing.assert_close(scores[row].top_logprobs, whole[:-1].topk(k, -1).values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(whole[:-1].gather(1, scores[row].top_ids), scores[row].top_logprobs, rtol=1e-5,
                                   atol=1e-5)
    return scores


def test_read_prompts_scores_each_rows_prompt_under_its_policy(saved, solo):
    """The serving engine's echo: every prompt token's log-prob and the likeliest tokens' under the row's
    own policy, from the same forward's hidden states, equal to each row's solo model over the prompt."""
    _, vocab, paths = saved
    adapter_set = AdapterSet.from_pretrained(paths)
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(7, 4, 9, 5, 1))
    names, top = ["terse", None, "formal", "kind", "kind"], [3, 2, None, 0, 5]
    scores = check_read_prompts(adapter_set, solo.__getitem__, ids, mask, names, top)
    assert scores[4].combined.shape == (0,) and scores[4].top_ids.shape == (0, 5)  # a one-token prompt: nothing
    with pytest.raises(ValueError, match="top must hold one entry per row"):
        adapter_set.read_prompts(ids, mask, names, None, top=[1])


def test_per_row_arguments_take_any_iterable_and_bad_types_are_refused_by_name(saved):
    """A generator of names (or of top counts, numpy's and torch's integers among them) is read once, as
    the list; a string, a lone count, a path in place of name -> path, a name that is no string are
    refused naming the argument, not as an error from inside (a StopIteration, an unpacking error)."""
    _, vocab, paths = saved
    adapter_set = AdapterSet.from_pretrained((name, paths[name]) for name in ("terse", "formal"))
    assert adapter_set.names == ["terse", "formal"] and adapter_set.depth("formal") == 1
    ids, mask = left_padded_prompts(vocab=vocab, lengths=(7, 4))
    names = ["terse", None]
    want = adapter_set.generate(ids, mask, adapters=names, max_new_tokens=3, do_sample=False)
    got = adapter_set.generate(ids, mask, adapters=iter(names), max_new_tokens=3, do_sample=False)
    assert torch.equal(got, want)
    top = [np.int64(3), torch.tensor(2)]
    _, scores = adapter_set.read_prompts(ids, mask, iter(names), None, top=iter(top))
    assert scores[0].top_ids.shape[-1] == 3 and scores[1].top_ids.shape[-1] == 2
    for call, message in [
            (lambda: adapter_set.generate(ids, mask, adapters="terse", max_new_tokens=2), "adapters must name one adapter"),
            (lambda: adapter_set.generate(ids, mask, adapters=None, max_new_tokens=2), "adapters must name one adapter"),
            (lambda: adapter_set.generate(ids, mask, adapters=[["terse"], None], max_new_tokens=2),
             "adapters must name one adapter"),
            (lambda: adapter_set.read_prompts(ids, mask, names, None, top=3), "top must hold one entry per row"),
            (lambda: adapter_set.read_prompts(ids, mask, names, None, top=[True, None]), "integer >= 0 .*got True"),
            (lambda: adapter_set.read_prompts(ids, mask, names, None, top=[2.0, None]), "integer >= 0 .*got 2.0"),
            (lambda: adapter_set.next_scores(ids, None, names, None), "attention_mask must be a tensor"),
            (lambda: adapter_set.depth("nope"), "no adapter named 'nope'"),
            (lambda: adapter_set.load("kind", None), "path must be a saved adapter's directory"),
            (lambda: AdapterSet.from_pretrained(paths["terse"]), "adapters must be a mapping"),
            (lambda: AdapterSet.from_pretrained(str(paths["terse"])), "adapters must be a mapping"),
            (lambda: AdapterSet.from_pretrained([paths["terse"]]), "adapters must be a mapping.*got the item"),
            (lambda: AdapterSet.from_pretrained({"terse": None}), "the path of 'terse' must be")]:
        with pytest.raises((ValueError, TypeError, KeyError), match=message):
            call()
    assert adapter_set.names == ["terse", "formal"]


def test_loading_adapters_leaves_the_global_random_generator_as_it_was(saved):
    """Loading (a saved LoRA initialized at random by PEFT, then overwritten) draws nothing from the
    caller's seeded generator."""
    root, _, paths = saved
    torch.manual_seed(123)
    state = torch.get_rng_state()
    adapter_set = AdapterSet.from_pretrained({"terse": paths["terse"]}, str(root / "base"))
    adapter_set.load("formal", paths["formal"])
    assert torch.equal(torch.get_rng_state(), state)


def tiny_gpt2():
    """A tiny GPT-2: learned absolute position embeddings, where a token read one position off is read
    differently (a rotary model's attention sees only relative positions)."""
    import transformers

    config = transformers.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                                     eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.filterwarnings("error:fan_in_fan_out is set")  # GPT-2's Conv1D layers are wrapped as they store W
def test_next_scores_read_each_row_at_its_own_positions_on_an_absolute_position_base(tmp_path):
    """The serving engine's steps (``next_scores``: a left-padded prefill, then one token per row
    fed on the cache) read each row's tokens at positions 0, 1, ... of its own: on a GPT-2 base every
    row's scores are its solo model's over its tokens alone (no padding, no position ids given)."""
    from transformers import DynamicCache

    paths = save_perturbed_adapters(tmp_path, {"a": dict(alpha_tilde=0.7), "b": dict(lora_r=4, alpha_0=1.3)},
                                    tiny_gpt2)
    adapter_set = AdapterSet.from_pretrained(paths, base_model=tiny_gpt2())
    ids, mask = left_padded_prompts(lengths=(7, 4, 9))
    names = ["b", None, "a"]
    cache = DynamicCache()
    with torch.no_grad():
        first = adapter_set.next_scores(ids, mask, names, cache).log_softmax(-1)
        fed = torch.randint(3, 97, (len(names), 1), generator=torch.Generator().manual_seed(5))
        mask = torch.cat([mask, torch.ones_like(fed)], 1)
        second = adapter_set.next_scores(fed, mask, names, cache).log_softmax(-1)
    for row, name in enumerate(names):
        alone = torch.cat([ids[row, mask[row, :-1].bool()], fed[row]])[None]
        with torch.no_grad():
            if name is None:
                want = torch.log_softmax(tiny_gpt2()(input_ids=alone).logits.float(), -1)[0]
            else:
                want = QAdapterModel.from_pretrained(paths[name], tiny_gpt2()).eval().policy(input_ids=alone).logits[0]
        torch.testing.assert_close(first[row], want[-2], rtol=1e-5, atol=1e-5, msg=f"row {row} ({name}), prefill")
        torch.testing.assert_close(second[row], want[-1], rtol=1e-5, atol=1e-5, msg=f"row {row} ({name}), step")
