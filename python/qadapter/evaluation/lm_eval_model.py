"""A Q-Adapter as an lm-evaluation-harness model: standard benchmarks without a fork of either.

lm-eval scores a model through three calls (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``). A Q-Adapter is not a plain causal LM: its policy is the combined
``pi~ = log_softmax((Q + alpha_0 * log pi1) / alpha~)`` of the adapter model's logits ``Q`` and the
frozen base's ``pi1``, which no ``AutoModelForCausalLM`` computes. :class:`QAdapterLM` answers the
three calls from that policy: likelihoods from the frozen and adapter hidden states
(:meth:`QAdapterModel.hidden_states`) through the one vocabulary pass
(:func:`qadapter_kernels.vocabulary.vocabulary_pass`, with the model's loss options and soft cap), text from
:meth:`QAdapterModel.generate`. It registers as lm-eval model ``"qadapter"``::

    import qadapter.evaluation.lm_eval_model  # registers "qadapter"
    lm_eval.simple_evaluate(model="qadapter", model_args="adapter=DIR,batch_size=8", tasks=["mmlu"])

or from the command line, ``qadapter lm-eval --model_args adapter=DIR --tasks mmlu`` (lm-eval's run
options; it calls :func:`evaluate_tasks`). The shipped offline tasks (``qadapter_knowledge``,
``qadapter_tldr``) and the runner behind ``qadapter lm-eval`` are
:mod:`qadapter.experiments.lm_eval_run`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, resolve_max_length
from lm_eval.utils import (
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)
from tqdm import tqdm

from qadapter_kernels.config import check_integer
from qadapter_kernels.vocabulary import vocabulary_pass

from ..library.defaults import DEFAULT_MODEL
from ..library.hidden import evaluation_mode
from ..library.model import QAdapterModel
from ..library.policy import end_token_ids

DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256
# lm-eval's own options (--batch_size, --device) that reach the model besides its model_args.
RUN_OPTIONS = ("batch_size", "device")

log = logging.getLogger(__name__)


def resolve_device(name: str | None) -> torch.device:
    """``name``; a CUDA device (lm-eval's CLI defaults to ``cuda:0``) or none falls back to the CPU
    when no GPU is present."""
    if name and (not str(name).startswith("cuda") or torch.cuda.is_available()):
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pad_rows(rows: list[list[int]], pad_id: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as ``(input_ids, attention_mask)`` ``[B, T]``, padded on the left or the right."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[r, span], mask[r, span] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


class _AllStopped(Exception):
    """Raised inside generation once every row has stopped."""


class _StopWatch:
    """A ``generate`` streamer that keeps each row's new tokens up to its stop (an EOS token or a stop
    string in its text) and ends the generation (:class:`_AllStopped`) once every row has stopped.

    A stop string is looked for in the text of a row's last few tokens (at most 4 tokens a character,
    byte-level tokens, and a margin), so a step costs the same however long the text already is;
    special tokens' text (EOS) is never in decoded text: their ids stop a row instead.
    """

    def __init__(self, tokenizer, rows: int, eos_ids: set[int], until: list[str]):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.until = [stop for stop in until if stop not in tokenizer.all_special_tokens]
        self.window = 4 * max(map(len, self.until), default=0) + 4
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.stopped = [False] * rows
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call passes the prompts
            self.prompt_seen = True
            return
        for r, token in enumerate(value.tolist()):
            if self.stopped[r]:
                continue
            if token in self.eos_ids:
                self.stopped[r] = True
                continue
            self.tokens[r].append(token)
            if self.until:
                tail = self.tokenizer.decode(self.tokens[r][-self.window :], skip_special_tokens=True)
                self.stopped[r] = any(stop in tail for stop in self.until)
        if all(self.stopped):
            raise _AllStopped

    def end(self) -> None:
        """Nothing to flush: the tokens are read from :attr:`tokens`."""


@register_model("qadapter")
class QAdapterLM(TemplateLM):
    """lm-eval model ``qadapter``: the combined policy of a Q-Adapter.

    Model args: ``adapter`` (a saved adapter's directory, or a :class:`QAdapterModel` object; without
    it, a fresh adapter on ``base`` at ``alpha_0 = 0, alpha~ = 1``, whose policy is exactly the base's),
    ``base`` (the base model: path, hub name; default: the adapter's own, else the embedded default),
    ``batch_size``, ``max_length`` (default: the model's context length as lm-eval's own models read it, else 2048), ``device``
    (default: CUDA when present; a model object stays where it is unless given), ``dtype`` (e.g.
    ``bfloat16``; default: the checkpoint's; a 4-bit base's compute dtype unless ``quantization`` names
    one), ``quantization`` (the base quantized by bitsandbytes: ``4bit``, ``8bit``, or a dict as
    :mod:`qadapter.library.quantization` takes it; default: as the adapter was trained, dense without
    one), ``max_gen_toks`` (when a task gives none).
    """

    def __init__(self, adapter: str | os.PathLike | QAdapterModel | None = None, base: str | None = None, *,
                 batch_size: int | str = 8, max_length: int | None = None, device: str | None = None,
                 dtype: str | None = None, quantization: str | dict | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> None:
        super().__init__()
        torch_dtype = _dtype(dtype)
        if isinstance(adapter, QAdapterModel):
            if quantization is not None:
                raise ValueError("qadapter: quantization applies to a base loaded by name, not to a model object")
            model = adapter
            if device is not None:
                model.to(resolve_device(device))
        elif adapter is None:  # loaded onto the device (a quantized base cannot be moved after loading)
            model = QAdapterModel.from_base(base or DEFAULT_MODEL, torch_dtype=torch_dtype, device=resolve_device(device),
                                            quantization=quantization, alpha_0=0.0, alpha_tilde=1.0)
        else:
            model = QAdapterModel.from_pretrained(adapter, base, torch_dtype=torch_dtype, device=resolve_device(device),
                                                  quantization="saved" if quantization is None else quantization)
        if model.tokenizer is None:
            raise ValueError("the Q-Adapter has no tokenizer: build it with tokenizer=")
        self.model = model  # each call runs it in eval mode, and leaves it in the mode it was in
        self.tokenizer = model.tokenizer
        self._device = model.lm_head_weight.device
        self.batch_size = _positive_int("batch_size", batch_size)
        config = model.config
        # As lm-eval's own models read it: a composite config's text model (Gemma-3's) first.
        self.max_length = _positive_int("max_length", max_length or resolve_max_length(config, self.tokenizer,
                                                                                       default=DEFAULT_MAX_LENGTH))
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        eos = getattr(config, "eos_token_id", None)  # a config may list one its generation config does not
        self.eos_ids = ({*end_token_ids(model.base_model, self.tokenizer), *(eos if isinstance(eos, list) else [eos])}
                        - {None})
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> QAdapterLM:
        """``key=value,...`` model args; lm-eval's own ``--batch_size`` and ``--device`` fill in only
        what the model args leave out (its CLI always passes defaults for them)."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> QAdapterLM:
        """As :meth:`create_from_arg_string`, from a dict (what lm-eval's CLI passes)."""
        run = {k: v for k, v in (additional_config or {}).items() if k in RUN_OPTIONS and v is not None}
        return cls(**{**run, **arg_dict})

    # ---------------------------------------------------------------------------- tokenization
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context or a rolling window is conditioned on: BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        """Part of the key lm-eval's requests cache (``--cache_requests``) keeps the prompts it rendered
        under: the adapter's chat template options render them too, so an adapter prompted otherwise on
        this base is not handed them."""
        name = self.tokenizer.name_or_path.replace("/", "__")
        options = self.model.chat_template_kwargs
        if not options:
            return name
        return f"{name}-template_options{hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's ids; special tokens as it adds them by default, except a BOS the text
        already starts with (a chat template's)."""
        bos = self.tokenizer.bos_token
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer(string, **options).input_ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: the base tokenizer's chat template, with the options the adapter
        was trained with (its ``chat_template_kwargs``)."""
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt,
                                                  **self.model.chat_template_kwargs)

    # ----------------------------------------------------------------------------- likelihoods
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Per ``(cache key, context ids, continuation ids)``: the summed log-prob of the continuation
        under the combined policy, and whether it is the greedy one. Longest first in right-padded
        batches; the last ``max_length + 1`` tokens of a request are kept."""
        loss, weight = self.model.loss, self.model.lm_head_weight
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, disable=disable_tqdm, desc="qadapter loglikelihood"):
            batch = order[start : start + self.batch_size]
            rows, rows_idx, positions, targets = [], [], [], []
            for r, i in enumerate(batch):
                _, context, continuation = requests[i]
                if not 0 < len(continuation) <= self.max_length:
                    raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored within "
                                     f"max_length={self.max_length}")
                tokens = (context + continuation)[-(self.max_length + 1) :]
                rows.append(tokens[:-1])
                first = len(tokens) - 1 - len(continuation)  # the position predicting the first target
                rows_idx += [r] * len(continuation)
                positions += range(first, len(tokens) - 1)
                targets += continuation
            ids, mask = pad_rows(rows, self.pad_id, left=False)
            with evaluation_mode(self.model):  # no dropout; a model mid-training is left training
                base_hidden, q_hidden = self.model.hidden_states(ids.to(self.device), mask.to(self.device))
            at = (torch.tensor(rows_idx, device=self.device), torch.tensor(positions, device=self.device))
            base_hidden, q_hidden = base_hidden[at], q_hidden[at]
            targets = torch.tensor(targets, device=self.device)
            measures = vocabulary_pass(base_hidden, q_hidden, weight, targets, config=loss,
                                       measures=("logprobs", "greedy"))
            counts = [len(requests[i][2]) for i in batch]
            logprob_sums = measures.combined.double().split(counts)
            for i, lp, greedy in zip(batch, logprob_sums, (measures.greedy == targets).split(counts)):
                results[i] = (lp.sum().item(), bool(greedy.all()))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood under the combined policy, each text in disjoint windows of
        ``max_length`` tokens (lm-eval's rolling windows, the first conditioned on BOS/EOS)."""
        windows, owners = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(k)
        totals = [0.0] * len(requests)
        for k, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of the combined policy, each cut before the first of its ``until``
        strings (an empty one ignored); at most ``max_gen_toks`` tokens. Requests with the same generation options run
        together, longest first, in left-padded batches; a batch ends once every row has stopped."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos_text = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="qadapter generate_until")
        for indices in groups.values():
            options = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            if options.get("do_sample"):
                log.warning("qadapter: the task asks for sampling (%s); decoding greedily", options)
            # An empty stop string stops nothing, as lm-eval's own models ignore it ("" is in every text).
            until = [stop for stop in handle_stop_sequences(options.get("until"), eos=eos_text) if stop]
            max_gen_toks = options["max_gen_toks"]
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt within "
                                 f"max_length={self.max_length}")
            contexts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen_toks) :]
                        or [self.prefix_token_id] for i in indices}  # an empty context: BOS/EOS
            indices = sorted(indices, key=lambda i: -len(contexts[i]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                ids, mask = pad_rows([contexts[i] for i in batch], self.pad_id, left=True)
                watch = _StopWatch(self.tokenizer, len(batch), self.eos_ids, until)
                try:
                    self.model.generate(ids.to(self.device), mask.to(self.device), max_new_tokens=max_gen_toks,
                                        eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id, streamer=watch)
                except _AllStopped:
                    pass
                for i, tokens in zip(batch, watch.tokens):
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return results


def _positive_int(name: str, value) -> int:
    """A count given in lm-eval's model arguments, which its command line passes as strings ("4")."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    return check_integer(f"qadapter: {name}", value, least=1)


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name (``bfloat16``), as lm-eval's model args give it."""
    if name is None or isinstance(name, torch.dtype):
        return name
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"qadapter: dtype must name a torch dtype (float32, bfloat16, float16); got {name!r}")
    return value
