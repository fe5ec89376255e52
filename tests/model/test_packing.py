"""Padding-free forwards (qadapter.library.packing): the packed layout lets every token see exactly the
tokens it sees padded, at the same positions; the frozen and adapter passes packed give the padded
hidden states, loss and LoRA gradient; a model whose attention would mix packed sequences is refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
from helpers import make_model, shared_prompt_pairs, tiny_causal_lm  # noqa: E402
from qadapter import PreferenceCollator, frozen_and_adapter_hidden  # noqa: E402
from qadapter.library import hidden as hidden_module  # noqa: E402
from qadapter.library import packing  # noqa: E402
from qadapter.library.model import QAdapterModel  # noqa: E402

VOCAB = 97


def left_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shift = (mask == 0).sum(1)
    return (torch.stack([row.roll(int(s)) for row, s in zip(ids, shift)]),
            torch.stack([row.roll(int(s)) for row, s in zip(mask, shift)]))


def seen_packed(packed: packing.PackedBatch) -> dict[int, set]:
    """Per packed place, the (position, token) of every place it attends to: through its 4D mask, or
    as transformers reads rows without one (a sequence starts where the positions do not go up by 1)."""
    ids, positions = packed.inputs["input_ids"], packed.inputs["position_ids"]
    rows, width = ids.shape
    mask = packed.inputs["attention_mask"]
    if mask is None:
        starts = torch.ones_like(positions, dtype=torch.bool)
        starts[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
        sequence = starts.cumsum(1)
        visible = (sequence[:, :, None] == sequence[:, None, :]) & (positions[:, None, :] <= positions[:, :, None])
    else:
        visible = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0
    return {r * width + q: {(int(positions[r, k]), int(ids[r, k])) for k in range(width) if visible[r, q, k]}
            for r in range(rows) for q in range(width)}


@pytest.mark.parametrize("attention,window", [("sdpa", None), ("eager", None), ("eager", 6), ("flash_attention_2", None)])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("hidden_size", [0, 1000])  # 1000: rows long enough for every tree at once
def test_every_token_sees_what_it_sees_padded(attention, window, seed, padding, hidden_size):
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(6, seed))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if padding == "left":
        ids, mask = left_padded(ids, mask)
    packed = packing.pack_batch(ids, mask, attention=attention, sliding_window=window, hidden_size=hidden_size)
    assert packed is not None and packed.tokens < ids.numel()
    # Shared prompts run once where the attention takes a 4D mask; sequences whole otherwise.
    assert (packed.inputs["attention_mask"] is not None) == (attention != "flash_attention_2" and window is None)
    if attention == "flash_attention_2":
        assert packed.inputs["input_ids"].shape[0] == 1 and packed.tokens == int(mask.sum())
    else:  # the memory plan's bound on the mask: rows at most 2 max(2 * longest, d), fewer places than B * T
        assert packed.inputs["input_ids"].shape[1] <= 2 * max(2 * int(mask.sum(1).max()), hidden_size)
    assert_sees_as_padded(packed, ids, mask)


def assert_sees_as_padded(packed: packing.PackedBatch, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """Every token of the batch, at its packed place, is itself and sees exactly its own sequence's
    tokens up to it, at their positions."""
    seen = seen_packed(packed)
    for r in range(ids.shape[0]):
        tokens = ids[r][mask[r] == 1].tolist()
        first = int(mask[r].argmax())
        for t in range(len(tokens)):
            place = int(packed.source[r * ids.shape[1] + first + t])
            assert seen[place] == {(k, tokens[k]) for k in range(t + 1)}, (r, t)
            assert packed.inputs["input_ids"].view(-1)[place] == tokens[t]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_row_repeated_whole_runs_once(attention):
    features = shared_prompt_pairs(3, seed=4)
    features += [dict(features[0]), dict(features[1])]  # the same pairs again (a prompt's several pairs)
    batch = PreferenceCollator(pad_token_id=0)(features)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    packed = packing.pack_batch(ids, mask, attention=attention)
    assert_sees_as_padded(packed, ids, mask)
    source = packed.source.view(ids.shape)
    for copy, original in ((3, 0), (4, 1), (8, 5), (9, 6)):  # [chosen x 5, rejected x 5]
        torch.testing.assert_close(source[copy], source[original], rtol=0, atol=0)


def test_a_model_packs_short_rows_up_to_its_hidden_size(monkeypatch):
    seen = {}
    monkeypatch.setattr(packing, "pack_batch", lambda ids, mask, **options: seen.update(options))
    lm = tiny_causal_lm("llama", vocab=VOCAB)
    packing.model_packing(lm)(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    assert seen["hidden_size"] == lm.config.hidden_size and seen["attention"] == lm.config._attn_implementation


@pytest.mark.parametrize("seed", range(4))
def test_a_prefix_every_row_shares_neither_joins_the_batch_nor_parts_a_pair(seed):
    pairs = 8
    features = shared_prompt_pairs(pairs, seed, longest_prompt=12, system=(1, 2, 1))
    batch = PreferenceCollator(pad_token_id=0)(features)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    packed = packing.pack_batch(ids, mask, attention="sdpa")
    assert_sees_as_padded(packed, ids, mask)
    # The system prompt alone would join all 16 rows; a tree holds at most two of the longest rows, so
    # in rows as long as the largest tree (the model's size not given) each packed row's attention
    # costs at most twice a padded row's per token, the batch's at most twice the padded batch's.
    rows, width = packed.inputs["input_ids"].shape
    longest = int(mask.sum(1).max())
    assert rows > 1 and width <= 2 * longest
    assert rows * width**2 <= 2 * ids.shape[0] * longest**2
    # Each rejected row (the layout's second half) still takes its prompt from its chosen row.
    source = packed.source.view(ids.shape)
    for i, pair in enumerate(features):
        prompt = sum(label == -100 for label in pair["chosen_labels"])
        torch.testing.assert_close(source[pairs + i, :prompt], source[i, :prompt], rtol=0, atol=0)
    # Rows a model deems short (its hidden size in tokens) may join further: here all of them, once.
    joined = packing.pack_batch(ids, mask, attention="sdpa", hidden_size=int(mask.sum()))
    assert_sees_as_padded(joined, ids, mask)
    assert joined.inputs["input_ids"].shape[0] == 1 and joined.tokens < packed.tokens


@pytest.mark.parametrize("seed", range(3))
def test_short_rows_join_up_to_the_hidden_size_that_size_included(seed):
    """Four rows of 4 tokens sharing 2 (two of them 3): joined into one tree they hold 9 tokens, each
    prefix once, past two of the longest rows (8); a model of hidden size 9 takes that tree whole, one
    of 8 does not."""
    g = torch.Generator().manual_seed(seed)
    tokens = (torch.randperm(90, generator=g) + 3).tolist()
    prefix, third = tokens[:2], tokens[2]
    rows = [prefix + [third, tokens[3]], prefix + [third, tokens[4]], prefix + tokens[5:7], prefix + tokens[7:9]]
    order = torch.randperm(len(rows), generator=g).tolist()
    ids = torch.tensor([rows[i] for i in order])
    mask = torch.ones_like(ids)
    each_prefix_once = len({tuple(row[:k + 1]) for row in rows for k in range(len(row))})
    assert each_prefix_once == 9
    whole = packing.pack_batch(ids, mask, attention="sdpa", hidden_size=each_prefix_once)
    assert_sees_as_padded(whole, ids, mask)
    assert whole.inputs["input_ids"].shape == (1, each_prefix_once) and whole.tokens == each_prefix_once
    parted = packing.pack_batch(ids, mask, attention="sdpa", hidden_size=each_prefix_once - 1)
    assert_sees_as_padded(parted, ids, mask)
    assert parted.tokens > each_prefix_once


@pytest.mark.parametrize("sizes,hidden_size,most,capacity", [
    ([10, 7, 5], 0, 100, 10),  # the model's size unknown: rows as long as the largest tree
    ([10, 7, 5], 1, 100, 10),  # attention dear beside the linear layers: 3 rows of 10, 30 * 13 < 22 * 25
    ([10, 7, 5], 1000, 100, 22),  # attention cheap: one row of 22 (22 * 3022) against three of 10 (30 * 3010)
    ([10, 7, 5], 1000, 20, 10),  # at most 20: no row of 22; two of 20 (40 * 3020) cost more than three of 10
    ([10, 6, 4], 1000, 100, 10),  # rows of 10 hold everything without filler: 20 * 3010 < 20 * 3020
])
def test_rows_take_the_length_that_costs_least(sizes, hidden_size, most, capacity):
    assert packing.row_capacity(sizes, hidden_size, most) == capacity


def test_eager_rows_keep_no_more_than_the_padded_batch():
    """Eager attention (Gemma-2's) keeps every score for the backward, its rows' length squared: where
    sdpa joins the batch into one long row, eager rows keep no more than the padded batch by the
    packer's estimate (R C (w + C), w scores weighing a token), and a layout that saves tokens but
    would keep more stays padded; with scores that weigh little, short rows still join."""
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(8, seed=3))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    (rows, width), hidden, weight = ids.shape, 4 * int(mask.sum()), 8
    sdpa = packing.pack_batch(ids, mask, attention="sdpa", hidden_size=hidden)
    eager = packing.pack_batch(ids, mask, attention="eager", hidden_size=hidden, score_weight=weight)
    assert sdpa.inputs["input_ids"].shape[0] == 1
    assert_sees_as_padded(eager, ids, mask)
    r, c = eager.inputs["input_ids"].shape
    assert r * c * (weight + c) <= rows * width * (weight + width) and r * c * c < sdpa.tokens ** 2
    light = packing.pack_batch(ids, mask, attention="eager", hidden_size=hidden, score_weight=100 * hidden)
    assert light.inputs["input_ids"].shape == sdpa.inputs["input_ids"].shape
    # One pair, a short shared prompt and long answers: one tree saves 2 tokens, but its row of 98 would
    # keep 98 * (8 + 98) where the padded pair keeps 2 * 50 * (8 + 50).
    pair = {"chosen_input_ids": [5, 6] + [7] * 48, "chosen_labels": [-100] * 2 + [7] * 48,
            "rejected_input_ids": [5, 6] + [8] * 48, "rejected_labels": [-100] * 2 + [8] * 48}
    ids, mask = (PreferenceCollator(pad_token_id=0)([pair])[k] for k in ("input_ids", "attention_mask"))
    assert packing.pack_batch(ids, mask, attention="sdpa", hidden_size=64).tokens == 98
    assert packing.pack_batch(ids, mask, attention="eager", hidden_size=64, score_weight=weight) is None
    assert packing.row_capacity([98], 64, 196, score_weight=weight, budget=2 * 50 * (weight + 50)) is None


def test_a_models_scores_weigh_what_the_memory_plan_says():
    """A model packs with the weight of its eager scores that the memory plan's activation model
    gives: a token's kept bytes in a layer over a query-key pair's, every head's."""
    from qadapter.library.memory_plan import ModelShape, PlanOptions, layer_activation_bytes, scores_per_token

    lm = tiny_causal_lm("gemma2", vocab=VOCAB)
    lm.set_attn_implementation("eager")  # Gemma-2's default in later transformers 5 releases
    seen = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packing, "pack_batch", lambda ids, mask, **options: seen.update(options))
        packing.model_packing(lm)(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    shape = ModelShape.from_config(lm.config)
    assert shape.attention == "eager" and seen["score_weight"] == scores_per_token(lm.config, torch.float32)
    adapted = {n: s for n, s in shape.adaptable_layers().items() if n in shape.default_targets()}
    one, two = (layer_activation_bytes(shape, PlanOptions(max_length=t, dtype="float32"), 4, adapted) for t in (1, 2))
    assert seen["score_weight"] == (2 * one - two) // (two - one)  # kept bytes = token part + T * score part
    sdpa = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(packing, "pack_batch", lambda ids, mask, **options: sdpa.update(options))
        packing.model_packing(tiny_causal_lm("llama", vocab=VOCAB))(torch.ones(2, 3, dtype=torch.long),
                                                                    torch.ones(2, 3, dtype=torch.long))
    assert sdpa["score_weight"] is None


def test_hidden_states_go_back_to_the_batch_layout():
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(5, seed=11))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    packed = packing.pack_batch(ids, mask, attention="sdpa")
    hidden = torch.randn(*packed.inputs["input_ids"].shape, 3, requires_grad=True)
    whole = packed.unpack(hidden)
    assert whole.shape == (*ids.shape, 3) and not whole[mask == 0].any()
    rows, positions = mask.nonzero(as_tuple=True)
    torch.testing.assert_close(packed.at(hidden, rows, positions), whole[rows, positions], rtol=0, atol=0)
    # Each token's state comes from its packed place: a shared prompt's place feeds both of its rows.
    places = packed.source.view(ids.shape)[rows, positions]
    torch.testing.assert_close(whole[rows, positions], hidden.detach().reshape(-1, 3)[places], rtol=0, atol=0)
    whole.sum().backward()
    uses = torch.zeros(hidden.shape[:2]).view(-1).index_add_(0, places, torch.ones(len(places)))
    torch.testing.assert_close(hidden.grad[..., 0].reshape(-1), uses, rtol=0, atol=0)
    assert uses.max() >= 2  # some prompt tokens are shared


def test_nothing_to_save_or_tokens_not_one_run_is_no_packing():
    ids = torch.randint(3, VOCAB, (3, 5))
    assert packing.pack_batch(ids, torch.ones_like(ids), attention="sdpa") is None  # no padding, no shared prefix
    gaps = torch.ones_like(ids)
    gaps[0, 2] = 0
    assert packing.pack_batch(ids, gaps, attention="sdpa") is None


def peft_lm(family: str, attention: str):
    """A trained-looking LoRA'd tiny model (no dropout: padded and packed passes see one network)."""
    model = make_model(family, lora_dropout=0.0)
    model.base_model.config._attn_implementation = attention
    return model.peft_model.eval()


@pytest.mark.parametrize("family,attention,window", [
    ("llama", "sdpa", None), ("qwen2", "eager", None), ("mistral", "sdpa", 5),
    ("gemma", "eager", None), ("gemma2", "eager", None), ("gemma2", "eager", 5),
])
def test_packed_passes_give_the_padded_hidden_states(family, attention, window):
    model = peft_lm(family, attention)
    if window is not None:  # a window shorter than the sequences: packed whole, without a 4D mask
        model.get_base_model().config.sliding_window = window
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(4, seed=3))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cap = model.get_base_model().config.final_logit_softcapping if family == "gemma2" else None
    padded = frozen_and_adapter_hidden(model, ids, mask, logit_softcap=cap, padding_free=False)
    packed = frozen_and_adapter_hidden(model, ids, mask, logit_softcap=cap)  # padding-free by default
    attended = mask.bool()
    for a, b in ((padded.base_hidden, packed.base_hidden), (padded.q_hidden, packed.q_hidden)):
        torch.testing.assert_close(b[attended], a[attended], rtol=1e-5, atol=1e-5)
    assert packed.q_hidden.requires_grad and not packed.base_hidden.requires_grad


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_padding_free_training_step_matches_the_padded_one(family):
    model = make_model(family, lora_dropout=0.0)
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(4, seed=5))
    results = []
    for flag in (False, True):
        model.padding_free = flag
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.loss.detach(), out.chosen_rewards.detach(), grads))
        ids = batch["input_ids"]
        ran = model.packing()(ids, batch["attention_mask"]).tokens if flag else ids.numel()
        assert out.pass_tokens == ran
    assert ran < ids.numel()  # the batch's pairs share their prompts
    (loss, rewards, grads), (packed_loss, packed_rewards, packed_grads) = results
    # float32 throughout: the two differ by rounding only (other GEMM shapes, other summation orders).
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed_rewards, rewards, rtol=1e-5, atol=1e-5)
    assert float((packed_grads - grads).norm() / grads.norm()) < 1e-5


@pytest.mark.parametrize("family,options", [
    ("llama", dict(value_at="next", reward_norm="padded", backend="chunked", checkpointing=True)),
    ("llama", dict(value_at="current", reward_norm="sum", backend="auto", grad_filter_eps="auto")),
    ("qwen2", dict(value_at="next", reward_norm="mean", backend="reference", checkpointing=True)),
    ("gemma2", dict(value_at="next", reward_norm="sum", backend="auto", grad_filter_eps="auto", checkpointing=True)),
    ("gemma2", dict(value_at="current", reward_norm="mean", backend="chunked")),
])
def test_padding_free_steps_with_other_options_match_the_padded_reference(family, options):
    """Padding-free training beside the loss options, backends, gradient filtering and gradient
    checkpointing (Gemma-2: its logit soft cap too): loss, rewards and LoRA gradient those of the same
    batch run padded through the reference backend, exact gradient, no checkpointing. float32: rounding
    only (measured within 1e-6 of the loss, 1e-6 of the gradient's norm); "auto" filtering of float32
    inputs leaves out less than a unit roundoff of each token's policy."""
    options = dict(options)
    checkpointing = options.pop("checkpointing", False)
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(4, seed=5))
    results = []
    for packed in (False, True):
        run = options if packed else {**options, "backend": "reference", "grad_filter_eps": 0.0}
        model = make_model(family, lora_dropout=0.0, padding_free=packed, **run)
        if packed and checkpointing:
            model.gradient_checkpointing_enable()
            assert model.base_model.is_gradient_checkpointing
        model.train()
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (padded, want), (packed, got) = results
    assert packed.pass_tokens < padded.pass_tokens and got.keys() == want.keys() and want
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.chosen_rewards, padded.chosen_rewards, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.rejected_rewards, padded.rejected_rewards, rtol=1e-5, atol=1e-5)
    flat = [torch.cat([g[n].flatten() for n in sorted(want)]) for g in (want, got)]
    assert float((flat[1] - flat[0]).norm() / flat[0].norm()) < 1e-5


def test_a_packed_training_forward_keeps_one_mask_for_every_layer():
    """sdpa takes the packed rows' mask as it is, additive: no layer turns a boolean one into a float
    copy of its own, which the adapter pass would keep per layer for the backward."""
    model = make_model("llama", lora_dropout=0.0)
    assert model.config._attn_implementation == "sdpa"
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(4, seed=5))
    masks = set()

    def keep(saved):
        if saved.dim() == 4 and saved.shape[1] == 1 and saved.shape[2] == saved.shape[3] > 1:
            masks.add(saved.untyped_storage().data_ptr())
        return saved

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda saved: saved):
        model(**batch).loss.backward()
    assert len(masks) == 1 and model.config.num_hidden_layers > 1


def test_a_training_forward_gathers_the_head_once(monkeypatch):
    """Under ZeRO-3 or FSDP2 each read of the head's whole weight is an all-gather: one per step."""
    from qadapter.library import hidden
    from qadapter.library import model as model_module

    reads = []

    def counted(weight):
        reads.append(weight)
        return weight

    monkeypatch.setattr(hidden, "full_weight", counted)
    monkeypatch.setattr(model_module, "full_weight", counted)
    model = make_model("llama", lora_dropout=0.0)
    model(**PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(2, seed=2))).loss.backward()
    assert len(reads) == 1


def test_the_default_model_trains_padding_free_and_the_option_is_checked():
    model = QAdapterModel(tiny_causal_lm("llama", vocab=VOCAB))
    assert model.padding_free is True
    with pytest.raises(TypeError, match="padding_free must be True or False"):
        QAdapterModel(tiny_causal_lm("llama", vocab=VOCAB), padding_free="yes")


def test_a_callers_own_positions_are_run_as_given():
    model = peft_lm("llama", "sdpa")
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(3, seed=1))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    padded = frozen_and_adapter_hidden(model, ids, mask, position_ids=positions, padding_free=False)
    asked = frozen_and_adapter_hidden(model, ids, mask, position_ids=positions)
    torch.testing.assert_close(asked.q_hidden, padded.q_hidden, rtol=0, atol=0)


@pytest.mark.parametrize("broken", ["4d mask ignored", "sequences not told apart"])
def test_an_attention_that_mixes_packed_sequences_is_refused(monkeypatch, broken):
    if broken == "4d mask ignored":  # a causal mask over the whole packed row: a tail sees another's
        model = peft_lm("llama", "sdpa")

        def causal_only(spans, capacity, parent, shared, device):
            return torch.ones(len(spans), 1, capacity, capacity, dtype=torch.bool, device=device).tril()

        monkeypatch.setattr(packing, "_tree_mask", causal_only)
    else:  # no 4D mask (a sliding window cuts the sequences) and position_ids not read as sequences
        import transformers.masking_utils

        model = peft_lm("mistral", "sdpa")
        model.get_base_model().config.sliding_window = 3
        monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    monkeypatch.setattr(hidden_module, "_PACKING_CHECKED", type(hidden_module._PACKING_CHECKED)())
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(3, seed=2))
    with pytest.raises(ValueError, match="padding_free: .* does not keep packed sequences apart.*padding_free=False"):
        frozen_and_adapter_hidden(model, batch["input_ids"], batch["attention_mask"])


def test_measures_through_the_model_run_packed_and_agree(monkeypatch):
    """customized_likelihood (lm-eval's and the probe's log-probs) hands position_ids=None on: the
    passes still pack, and the log-probs are the padded ones."""
    from qadapter.evaluation.measures import Targets, customized_likelihood

    model = make_model("qwen2", lora_dropout=0.0)
    packed_batches = []
    checked = hidden_module.checked_packing

    def spy(*args):
        pack = checked(*args)
        return lambda ids, mask: packed_batches.append(pack(ids, mask)) or packed_batches[-1]

    monkeypatch.setattr(hidden_module, "checked_packing", spy)
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(3, seed=4))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, positions = (mask[:, 1:] == 1).nonzero(as_tuple=True)
    targets = Targets(rows, positions, ids[rows, positions + 1])
    logprobs = {}
    for flag in (False, True):
        model.padding_free = flag
        logprobs[flag] = customized_likelihood(model)(ids, mask, None, targets)
    assert len(packed_batches) == 1 and packed_batches[0] is not None
    torch.testing.assert_close(logprobs[True], logprobs[False], rtol=1e-5, atol=1e-5)



def test_the_probe_leaves_every_module_in_its_mode(monkeypatch):
    """A wrapper in train mode around a model its owner put in eval mode (no dropout): after the
    packing probe, the model is still in eval mode (restoring the wrapper's mode would train it)."""
    model = peft_lm("llama", "sdpa")
    wrapper = torch.nn.Module()
    wrapper.module = model
    wrapper.forward = lambda **kwargs: model(**kwargs)
    wrapper.train()
    model.eval()
    monkeypatch.setattr(hidden_module, "_PACKING_CHECKED", type(hidden_module._PACKING_CHECKED)())
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(3, seed=8))
    frozen_and_adapter_hidden(wrapper, batch["input_ids"], batch["attention_mask"])
    assert wrapper.training and not any(m.training for m in model.modules())


def test_the_packed_mask_takes_the_dtype_of_the_queries_not_of_the_head(monkeypatch):
    """A head kept in float32 over a bfloat16 model (transformers' ``_keep_in_fp32_modules`` for some
    models, or an upcast for exact log-probs): sdpa's queries are bfloat16, and its CUDA kernels take
    an additive mask of the queries' dtype only ('invalid dtype for bias')."""
    base = tiny_causal_lm("qwen2").to(torch.bfloat16)  # an untied head
    base.lm_head.float().register_forward_pre_hook(lambda head, args: (args[0].float(),))  # as such a model's forward
    model = QAdapterModel(base, lora_dropout=0.0).peft_model.eval()
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        seen.append((query.dtype, None if attn_mask is None else attn_mask.dtype))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    batch = PreferenceCollator(pad_token_id=0)(shared_prompt_pairs(4, seed=3))
    packed = frozen_and_adapter_hidden(model, batch["input_ids"], batch["attention_mask"])
    masked = [(query, mask) for query, mask in seen if mask is not None]  # not each sequence run alone
    assert masked and all(mask == query == torch.bfloat16 for query, mask in masked)
    assert packed.q_hidden.dtype == torch.bfloat16
