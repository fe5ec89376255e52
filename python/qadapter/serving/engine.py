"""Continuous batching of customized policies over one frozen base: requests join and leave the running
batch between decode steps, each row decoding its own adapter's policy (an
:class:`~qadapter.library.adapter_set.AdapterSet`).

Why an engine of its own: transformers' ``generate`` runs a batch fixed from start to end, and its
continuous-batching manager packs requests into one row of a paged cache, while the combined policy
runs every request on several rows of a batch (frozen and adapter; a stack's levels; the base's
frozen one alone). Here the KV cache is transformers' ``DynamicCache`` over those rows (the frozen
rows of all requests, then each request's level rows, as the adapter set's row plan lays them out,
left-padded to a common length); a joining request is prefilled on its own rows and its cache spliced in, a
finished one's rows are dropped, and the padding columns no row needs any more are cut. A row's next
token is the argmax of its policy log-probs (greedy rows, in one batched argmax) or, for a row that
asks for more, taken from its log-probs after transformers' repetition penalty (over prompt and
answer), OpenAI's frequency and presence penalties (over the answer) and its ``logit_bias`` and,
when sampling, transformers' warpers (temperature, top-k, top-p, min-p).

One thread owns the model (:meth:`Engine.start`); requests are submitted from any thread and hear of
their tokens through their ``emit`` callback. Adapters are loaded and unloaded while it serves
(:meth:`Engine.load_adapter`, :meth:`Engine.unload_adapter`): that thread runs the change between two
decode steps, and an adapter is unloaded only when no request for it is queued or running. It counts
its work in Prometheus metrics (:mod:`qadapter.serving.metrics`, ``Engine.metrics``). With a prefix
cache (:mod:`qadapter.serving.prefix_cache`), a prompt that starts as a finished request's sequence did
under the same policy is read from there on only.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import queue
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from qadapter_kernels.config import check_integer

from ..library.adapter_set import AdapterSet
from ..library.policy import end_token_ids
from ..library.saved import locate_adapter
from .metrics import EngineMetrics
from .prefix_cache import Entry, PrefixCache


class EngineStopped(RuntimeError):
    """The engine takes no more requests: it is shutting down."""


class RequestRefused(ValueError, KeyError):
    """A request the engine cannot run, refused before it is queued; ``field`` names the request's
    field at fault (``prompt``, ``max_tokens``, ``adapter`` or a decoding option), so that a server
    can point its client at the field of its own request. (A KeyError too: an adapter not loaded was
    one before.)"""

    __str__ = ValueError.__str__  # the message as it is, not quoted as a KeyError's key

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self):
        """Rebuilt from its message and field (an exception pickles its arguments alone, and this
        constructor needs both), then given its attributes back, notes (``add_note``) included: an
        engine driven from another process gets its refusals whole."""
        return type(self), (self.args[0], self.field), self.__dict__


class AdapterBusy(RuntimeError):
    """An adapter cannot be unloaded: requests for it are queued or running."""


@dataclass
class Request:
    """One completion: the prompt's token ids, the adapter it decodes (None: the base), and how.

    ``emit`` receives, on the engine's thread, ``{"text": delta}`` as text becomes final, then once
    ``{"finish_reason": "stop" | "length" | "cancelled", "completion_tokens": n}``. With ``logprobs``
    (k), either event also carries ``"logprobs"``: for each answer token taken since the last event,
    ``(token, its log-prob, ((token, log-prob) of the k likeliest, ...))`` under the policy itself
    (before penalties and temperature). With ``echo`` too, a first event ``{"prompt_logprobs":
    entries}`` gives the same for the prompt's tokens (``(token, None, None)`` for its first, which
    nothing predicts); ``max_tokens`` 0 with ``echo`` asks for that alone (a prompt scored, no answer).
    """

    prompt: list[int]
    adapter: str | None
    max_tokens: int
    emit: Callable[[dict], None]
    temperature: float = 0.0  # 0: greedy (the warpers below then change nothing)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; transformers' (prompt and answer tokens)
    frequency_penalty: float = 0.0  # OpenAI's (answer tokens): minus this times a token's count so far
    presence_penalty: float = 0.0  # OpenAI's (answer tokens): minus this once a token occurred
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: token id -> added to its score
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: off; k >= 0: each answer token's log-prob and the k likeliest tokens'
    echo: bool = False  # with logprobs: the prompt's tokens' log-probs too (computed as the prompt is read)
    cancelled: bool = False  # set by the submitter (a client that went away); the engine drops the request
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the completion's text so far, up to the last whole character
    decoded: tuple[int, int] = (0, 0)  # token offsets of the decoding window: (prefix, read)
    sent: int = 0  # characters of the completion text already emitted
    generator: torch.Generator | None = None
    unsent_logprobs: list = field(default_factory=list)  # of the tokens taken since the last event
    submitted_at: float = 0.0  # time.monotonic() when it arrived (0: when submitted); when its first answer token came
    first_token_at: float | None = None
    counts_prompt: bool = True  # False: another choice of the same client request counts the prompt's tokens
    ended: bool = False  # its last event emitted (it is finished once, even where an error follows its end)

    @property
    def scores_prompt(self) -> bool:
        """Whether its prefill reads the prompt's own log-probs (``echo`` with ``logprobs``)."""
        return self.echo and self.logprobs is not None


class Engine:
    """Decodes submitted :class:`Request` s in one running batch of at most ``max_batch`` requests."""

    def __init__(self, adapter_set: AdapterSet, tokenizer, *, max_batch: int = 32,
                 max_prefill_tokens: int | None = None, prefix_cache_bytes: int = 0) -> None:
        max_batch = check_integer("max_batch", max_batch, least=1)
        if max_prefill_tokens is not None:
            max_prefill_tokens = check_integer("max_prefill_tokens", max_prefill_tokens, least=1, note=" or None")
        self.adapter_set, self.tokenizer, self.max_batch = adapter_set, tokenizer, max_batch
        # Prompt tokens, times the rows each request runs, read in one prefill at most (None: no bound);
        # a request over it alone is still read, alone.
        self.max_prefill_tokens = max_prefill_tokens
        # Finished requests' KV, reused by prompts that start the same way, within this many bytes (0: off).
        self.prefix_cache = None
        if prefix_cache_bytes:
            if attends_in_window(adapter_set.base_model):
                raise ValueError("prefix_cache_bytes: this model attends within a sliding window (Gemma-2, Mistral), "
                                 "which a reused prefix would move; leave it 0")
            self.prefix_cache = PrefixCache(prefix_cache_bytes)
        config = adapter_set.base_model.config.get_text_config()
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 0) or None
        self.eos = set(end_token_ids(adapter_set.base_model, tokenizer))
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        head = adapter_set.base_model.get_output_embeddings().weight
        self.vocab, self.device = head.shape[0], head.device
        self._pending: queue.Queue[Request] = queue.Queue()
        self._held: Request | None = None  # taken off the queue, over the prefill budget: first in line next time
        self._running: list[Request] = []
        self._joining: list[Request] = []  # taken off the queue, not yet in the batch
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, T]: which cached positions are real, per request
        self._next: torch.Tensor | None = None  # [B]: each request's latest token, not yet fed
        self._lock = threading.Lock()
        self._outstanding = 0  # submitted and not finished
        self._in_flight: Counter[str | None] = Counter()  # the same, by adapter name
        self._between_steps: queue.Queue[tuple[Callable, Future]] = queue.Queue()  # adapter changes
        self._closing = threading.Event()  # no new requests
        self._stopping = threading.Event()  # the thread ends, cancelling what still runs
        self._thread: threading.Thread | None = None
        # Each module's mode (train/eval) when the engine started, given back when it stops to each module
        # still in the eval mode the engine set; weak, so that an adapter unloaded while serving is freed.
        self._caller_modes: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()
        self.steps = 0
        base_name = getattr(adapter_set.base_model.config, "name_or_path", None) or "base"
        self.metrics = EngineMetrics(base_name, running=lambda: len(self._running),
                                     waiting=lambda: self._pending.qsize() + (self._held is not None),
                                     adapters=lambda: len(self.adapter_set.names),
                                     cached=lambda: 0 if self.prefix_cache is None else self.prefix_cache.held)

    # ------------------------------------------------------------------------------ submitting
    def check(self, request: Request) -> None:
        """Refuses, with :class:`RequestRefused` naming the field, what the engine cannot run (before
        it is queued; :meth:`submit` checks that its adapter is loaded)."""
        if isinstance(request.prompt, tuple):
            request.prompt = list(request.prompt)
        if not isinstance(request.prompt, list):  # a string, an array: each step would fail, ending the batch
            raise RequestRefused(f"the prompt must be a list of token ids; got {type(request.prompt).__name__}",
                                 "prompt")
        if not request.prompt:
            raise RequestRefused("the prompt must hold at least one token", "prompt")
        bad = next((t for t in request.prompt if not _token_id(t, self.vocab)), None)
        if bad is not None:
            raise RequestRefused(f"the prompt's token ids must be integers in [0, {self.vocab}); got {bad!r}",
                                 "prompt")
        if isinstance(request.stop, list):
            request.stop = tuple(request.stop)
        if not isinstance(request.stop, tuple) or not all(isinstance(s, str) and s for s in request.stop):
            # one string would stop at each of its characters
            raise RequestRefused(f"stop must be a tuple of non-empty strings; got {request.stop!r}", "stop")
        if not callable(request.emit):
            raise RequestRefused(f"emit must be a function taking each event; got {request.emit!r}", "emit")
        if not isinstance(request.max_tokens, int) or isinstance(request.max_tokens, bool) or request.max_tokens < 0:
            raise RequestRefused(f"max_tokens must be an integer >= 1 (0 with echo: the prompt alone); "
                                 f"got {request.max_tokens!r}", "max_tokens")
        if request.max_tokens == 0 and request.echo is not True:
            raise RequestRefused("max_tokens must be >= 1 without echo (0 asks for the echoed prompt alone); got 0",
                                 "max_tokens")
        if self.context_length is not None and len(request.prompt) + request.max_tokens > self.context_length:
            # The prompt is at fault where no limit would leave room for it and a token.
            alone = len(request.prompt) >= self.context_length or request.max_tokens == 0
            raise RequestRefused(f"the prompt ({len(request.prompt)} tokens) and max_tokens ({request.max_tokens}) "
                                 f"exceed the model's context length ({self.context_length})",
                                 "prompt" if alone else "max_tokens")
        for name, (holds, expected) in _sampling_expectations(request, self.vocab).items():
            if not holds:  # caught here, not as an error that ends the running batch
                raise RequestRefused(f"{name} must be {expected}; got {getattr(request, name)!r}", name)

    def submit(self, request: Request) -> None:
        self.check(request)
        if self._closing.is_set():
            raise EngineStopped("the server is shutting down")
        if request.temperature > 0:
            request.generator = torch.Generator(device=self.device)
            if request.seed is None:
                request.generator.seed()  # a fresh, non-deterministic seed
            else:
                request.generator.manual_seed(request.seed)
        with self._lock:  # checked again under the lock: an unload cannot come between the check and the queue
            if request.adapter is not None and request.adapter not in self.adapter_set.names:
                raise RequestRefused(f"model {request.adapter!r} is not loaded; loaded: {self.adapter_set.names}",
                                     "adapter")
            request.submitted_at = request.submitted_at or time.monotonic()
            self._outstanding += 1
            self._in_flight[request.adapter] += 1
            self._pending.put(request)
        if request.counts_prompt:  # as the usage counts it: each prompt once, however many choices read it
            self.metrics.prompt_tokens.inc(len(request.prompt))

    # ------------------------------------------------------------------------------ adapters
    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Loads the saved adapter ``path`` (a folder or a hub repository) as ``name`` while the running
        batch goes on: the files are found (a hub download) here, the model changes between two decode
        steps. Raises what :meth:`AdapterSet.load` raises (a name taken, another base, bad files)."""
        located = locate_adapter(path)
        self._run_between_steps(lambda: self.adapter_set.load(name, located))
        self.metrics.adapter_changes["load"].inc()

    def unload_adapter(self, name: str) -> None:
        """Unloads the adapter ``name`` between two decode steps; :class:`AdapterBusy` while requests
        for it are queued or running (no request loses its model), KeyError where none is loaded."""
        def unload() -> None:
            with self._lock:
                if self._in_flight[name]:
                    raise AdapterBusy(f"model {name!r} has {self._in_flight[name]} request(s) queued or running; "
                                      "unload it when they have finished")
                self.adapter_set.unload(name)
            if self.prefix_cache is not None:  # its policies' KV can serve no request now
                loaded = set(self.adapter_set.loras)
                self.prefix_cache.keep_policies(lambda policy: all(set(level) <= loaded for level in policy))
        self._run_between_steps(unload)
        self.metrics.adapter_changes["unload"].inc()

    def _run_between_steps(self, change: Callable[[], None]) -> None:
        """Runs ``change`` in the engine thread between decode steps (at once where no thread runs)."""
        if self._thread is None or not self._thread.is_alive():
            return change()
        done: Future = Future()
        self._between_steps.put((change, done))
        while True:
            try:
                return done.result(timeout=0.1)
            except FutureTimeout:
                if not self._thread.is_alive():  # it stopped before it took the change
                    self._apply_changes(EngineStopped("the server is shutting down"))

    def _apply_changes(self, error: Exception | None = None) -> None:
        """Runs the queued adapter changes (or answers each with ``error``: the engine is stopping)."""
        while True:
            try:
                change, done = self._between_steps.get_nowait()
            except queue.Empty:
                return
            if error is not None:
                done.set_exception(error)
                continue
            try:
                with torch.inference_mode(False):  # the adapters' tensors are ordinary ones, as at start
                    change()
                done.set_result(None)
            except Exception as exc:
                done.set_exception(exc)

    # ---------------------------------------------------------------------------------- thread
    def start(self) -> Engine:
        """Starts the decoding thread; once: a second thread would run the same batch."""
        if self._thread is not None:
            raise RuntimeError("this engine was started already (an engine runs one thread, once: make a new "
                               "Engine to serve again)")
        model = self.adapter_set.peft_model or self.adapter_set.base_model
        self._caller_modes.update((module, module.training) for module in model.modules())
        model.eval()  # no dropout while decoding; the caller's modes come back when the thread ends
        self._thread = threading.Thread(target=self._loop, name="qadapter-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def serving(self) -> bool:
        """Whether the engine takes requests: its thread runs and it is not shutting down."""
        return self._thread is not None and self._thread.is_alive() and not self._closing.is_set()

    def stop(self, grace: float = 0.0, timeout: float | None = 30.0) -> None:
        """Takes no new request, gives the running and queued ones ``grace`` seconds to finish, then
        cancels the rest (their clients hear ``finish_reason="cancelled"``) and joins the thread."""
        self._closing.set()
        self.wait_idle(grace)
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while not self._stopping.is_set():
                    self._apply_changes()
                    try:
                        self._admit(wait=not self._running)
                        if self._running:
                            self._step()
                    except Exception as exc:  # the batch is lost; its clients hear why, the engine goes on
                        if isinstance(exc, torch.cuda.OutOfMemoryError) and self.prefix_cache is not None:
                            self.prefix_cache.clear()  # only a cache: the batches after this one get its memory
                        joined = self._running + [r for r in self._joining if r not in self._running]
                        self._end_all({"error": f"{type(exc).__name__}: {exc}"}, joined)
            self._end_all({"finish_reason": "cancelled"}, self._running + self._drain())
            self._apply_changes(EngineStopped("the server is shutting down"))
        finally:  # here, not in stop(): a thread that outlives stop's timeout still decodes without dropout
            for module, training in self._caller_modes.items():
                if not module.training:  # as the engine left it: a train mode the caller set meanwhile stays
                    module.training = training  # this module alone: train() would set its children too

    def _end_all(self, event: dict, requests: list[Request]) -> None:
        for request in requests:
            self._finish(request, event)
        self._running, self._joining, self._cache, self._mask, self._next = [], [], None, None, None

    def _drain(self) -> list[Request]:
        taken, self._held = ([self._held] if self._held is not None else []), None
        while True:
            try:
                taken.append(self._pending.get_nowait())
            except queue.Empty:
                return taken

    # --------------------------------------------------------------------------------- batching
    def _admit(self, wait: bool) -> None:
        """Prefills the queued requests that fit (the running batch's room, the prefill budget) and
        splices them into the running batch."""
        room = self.max_batch - len(self._running)
        new, tokens = [], 0
        while len(new) < room:
            try:
                request = self._queued(wait=wait and not new)
            except queue.Empty:
                break
            cost = self._prefill_cost(request)
            if new and self.max_prefill_tokens is not None and tokens + cost > self.max_prefill_tokens:
                self._held = request
                break
            new.append(request)
            tokens += cost
        for request in new:
            if request.cancelled:  # its client left while it waited
                self._finish(request, {"finish_reason": "cancelled"})
            elif request.max_tokens == 0 and not request.scores_prompt:  # the echoed prompt's text is all it asks
                self._finish(request, {"finish_reason": "length"})
        new = self._joining = [r for r in new if not r.cancelled and (r.max_tokens or r.scores_prompt)]
        if new:
            self._prefill(new)
        self._joining = []

    def _queued(self, wait: bool) -> Request:
        """The next request in line (the one held back last time first); queue.Empty where none is."""
        if self._held is not None:
            request, self._held = self._held, None
            return request
        return self._pending.get(timeout=0.05) if wait else self._pending.get_nowait()

    def _prefill_cost(self, request: Request) -> int:
        """What a request adds to a prefill: its prompt's tokens on each row its policy runs (none where
        it will not be read: cancelled, or an echo without log-probs and no answer)."""
        if request.cancelled or not (request.max_tokens or request.scores_prompt):
            return 0
        return len(request.prompt) * (1 + self.adapter_set.depth(request.adapter))

    def _prefill(self, new: list[Request]) -> None:
        """Reads ``new`` requests' distinct prompts in one forward (a prompt that several requests ask of
        one model, ``n`` choices, is read once and its cache rows copied), with an echoing request's
        prompt log-probs read off the hidden states; splices the rows of those that go on decoding into
        the batch and takes their first tokens."""
        distinct: dict[tuple, int] = {}
        source = [distinct.setdefault((tuple(r.prompt), r.adapter), len(distinct)) for r in new]
        reads = [new[source.index(j)] for j in range(len(distinct))]
        adapters = [r.adapter for r in reads]
        top = [max((r.logprobs for r, j in zip(new, source) if j == row and r.scores_prompt), default=None)
               for row in range(len(reads))]
        reused = self._reused_prefixes(reads) if all(k is None for k in top) else None
        ids, mask = self._read_inputs(reads, [0] * len(reads) if reused is None else [n for n, _ in reused])
        if reused is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        else:  # read after the stored prefixes only
            cache = self._stored_prefixes(reads, reused)
        if any(k is not None for k in top):
            next_scores, scores = self.adapter_set.read_prompts(ids, mask, adapters, cache, top=top)
            for request, row in zip(new, source):
                if request.scores_prompt:
                    request.emit({"prompt_logprobs": [(request.prompt[0], None, None),
                                                      *_prompt_entries(request, scores[row])]})
        else:
            next_scores = self.adapter_set.next_scores(ids, mask, adapters, cache)
        for r in new:
            if r.max_tokens == 0:  # an echoed prompt scored alone: no answer token, no place in the batch
                self._finish(r, {"finish_reason": "length"})
        going_on = [i for i, r in enumerate(new) if r.max_tokens > 0]
        if not going_on:
            return
        rows = [source[i] for i in going_on]  # each request's read
        if rows != list(range(len(reads))):
            _keep_rows(cache, rows, self._depths(reads))
            mask, next_scores = mask[rows], next_scores[rows]
        new = [new[i] for i in going_on]
        self._splice(new, cache, mask)
        self._advance(new, next_scores, offset=len(self._running) - len(new))

    def _policy_key(self, adapter: str | None) -> tuple:
        """What a row's KV depends on: the LoRAs each level of the policy runs (none for the base)."""
        if adapter is None:
            return ()
        return tuple(self.adapter_set.adapters[self.adapter_set.names.index(adapter)].networks)

    def _reused_prefixes(self, reads: list[Request]) -> list[tuple[int, Entry | None]] | None:
        """Each read's longest stored prefix, or None where the prefix cache gives none."""
        if self.prefix_cache is None:
            return None
        found = [self.prefix_cache.longest(self._policy_key(r.adapter), r.prompt) for r in reads]
        self.metrics.prefix_cache_queries.inc(sum(len(r.prompt) for r in reads))
        self.metrics.prefix_cache_hits.inc(sum(n for n, _ in found))
        return found if any(n for n, _ in found) else None

    def _read_inputs(self, reads: list[Request], stored: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward's ids and mask for ``reads`` whose first ``stored[i]`` prompt tokens are in the
        cache already (0: read whole): the rest of each prompt, left-padded, and the mask over the
        stored positions (each read's right-aligned in a block of the longest one's width) and the new."""
        longest = max(stored)
        rest = [r.prompt[n:] for r, n in zip(reads, stored)]
        width = max(len(t) for t in rest)
        ids = torch.full((len(reads), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(reads), longest + width, dtype=torch.long)
        for row, (n, tokens) in enumerate(zip(stored, rest)):
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, longest - n:longest] = 1
            mask[row, longest + width - len(tokens):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _stored_prefixes(self, reads: list[Request], reused: list[tuple[int, Entry | None]]):
        """A cache holding each read's stored prefix (its first ``n`` positions, from the prefix cache)
        on the reads' rows (frozen rows, then level rows), right-aligned as :meth:`_read_inputs` lays
        out the mask."""
        from transformers import DynamicCache

        longest = max(n for n, _ in reused)
        depths = self._depths(reads)
        first = list(itertools.accumulate(depths, initial=len(reads)))  # each read's first level row
        sample = next(entry for _, entry in reused if entry is not None).kv
        layers = []
        for layer, (keys, _) in enumerate(sample):
            shape = (len(reads) + sum(depths), keys.shape[1], longest, keys.shape[3])
            kv = (keys.new_zeros(shape), keys.new_zeros(shape))
            for row, (n, entry) in enumerate(reused):
                if n:
                    rows = [row, *range(first[row], first[row] + depths[row])]
                    for stored, into in zip(entry.kv[layer], kv):
                        into[rows, :, longest - n:] = stored[:, :, :n]
            layers.append(kv)
        return DynamicCache(ddp_cache_data=layers)

    def _store_prefixes(self, finished: list[int], depths: list[int]) -> None:
        """Keeps the KV of the running batch's ``finished`` requests (their prompt and the answer tokens
        fed back) in the prefix cache, under their policies."""
        first = list(itertools.accumulate(depths, initial=len(depths)))
        for i in finished:
            request = self._running[i]
            if request.cancelled:
                continue
            real = self._mask[i].bool()
            count = int(real.sum())
            rows = torch.tensor([i, *range(first[i], first[i] + depths[i])], device=self._mask.device)
            kv = [(layer.keys.index_select(0, rows)[:, :, real], layer.values.index_select(0, rows)[:, :, real])
                  for layer in self._cache.layers]
            self.prefix_cache.store(self._policy_key(request.adapter), (request.prompt + request.tokens)[:count], kv)

    def _splice(self, new: list[Request], cache, mask: torch.Tensor) -> None:
        """Adds ``new`` requests' rows (their cache, frozen rows then level rows, and their ``mask``) to the batch."""
        if not self._running:
            self._running, self._cache, self._mask = list(new), cache, mask
            return
        b_old, b_new = len(self._running), len(new)
        width = max(self._mask.shape[1], mask.shape[1])
        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            for name in ("keys", "values"):
                old, added = _left_pad(getattr(old_layer, name), width), _left_pad(getattr(new_layer, name), width)
                setattr(old_layer, name, torch.cat([old[:b_old], added[:b_new], old[b_old:], added[b_new:]]))
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])
        self._running += new

    def _step(self) -> None:
        """One decode step of the whole running batch: feed each request's latest token."""
        with self.metrics.decode_step.time():
            self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._running), 1)], dim=1)
            next_scores = self.adapter_set.next_scores(self._next.unsqueeze(1), self._mask,
                                                       [r.adapter for r in self._running], self._cache)
            self.steps += 1
            self._advance(self._running, next_scores, offset=0)

    def _advance(self, requests: list[Request], next_scores: torch.Tensor, offset: int) -> None:
        """Samples each request's next token from its rows' scores (a policy's log-probs, the base's
        logits: :meth:`AdapterSet.next_scores`), emits the new text, and drops the requests that finished."""
        tokens = self._sample(requests, next_scores).tolist()
        entries = _logprob_entries(requests, next_scores, tokens)
        new_next = torch.tensor(tokens, device=self.device)
        # A step advances every row; an admission, the rows after the ``offset`` already running.
        self._next = new_next if offset == 0 else torch.cat([self._next[:offset], new_next])
        finished = [offset + i for i, (r, t, e) in enumerate(zip(requests, tokens, entries)) if self._take(r, t, e)]
        if finished:
            self._drop(finished)

    def _sample(self, requests: list[Request], next_scores: torch.Tensor) -> torch.Tensor:
        """Each request's next token: the batched argmax, replaced on the rows that ask for more."""
        tokens = next_scores.argmax(-1)
        for row, r in enumerate(requests):
            if r.temperature > 0 or _penalized(r):
                scores = penalize(r, next_scores[row:row + 1])
                tokens[row] = scores.argmax(-1)[0] if r.temperature == 0 else _draw(r, scores)
        return tokens

    def _take(self, request: Request, token: int, logprobs: tuple | None = None) -> bool:
        """Adds ``token`` (and its ``logprobs`` entry) to ``request``, emits the text that became final;
        True when it finished."""
        if request.cancelled:
            self._finish(request, {"finish_reason": "cancelled"})
            return True
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
            self.metrics.time_to_first_token.observe(request.first_token_at - request.submitted_at)
        finish = None
        if token in self.eos:
            finish = "stop"
        else:
            request.tokens.append(token)
            self.metrics.generation_tokens.inc()
            if logprobs is not None:
                request.unsent_logprobs.append(logprobs)
        text = completion_text(self.tokenizer, request, final=finish is not None or len(request.tokens) >= request.max_tokens)
        # Text sent holds no start of a stop string (its possible starts are held back): the search starts after it.
        cut = min((i for i in (text.find(s, request.sent) for s in request.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        if finish is None and len(request.tokens) >= request.max_tokens:
            finish = "length"
        final = len(text) if finish else _held_back(text, request.stop, request.sent)
        if final > request.sent:
            request.emit({"text": text[request.sent:final], **_unsent_logprobs(request)})
            request.sent = final
        if finish:
            self._finish(request, {"finish_reason": finish})
        return finish is not None

    def _finish(self, request: Request, event: dict) -> None:
        """The request's last event (its end, and how many tokens it got); it no longer counts as work.
        Once: a step that fails after a request ended (keeping its prefix) ends the batch's others."""
        if request.ended:
            return
        request.ended = True
        request.emit({**event, **_unsent_logprobs(request), "completion_tokens": len(request.tokens)})
        self.metrics.finished[event.get("finish_reason", "error")].inc()
        self.metrics.e2e_latency.observe(time.monotonic() - request.submitted_at)
        with self._lock:
            self._outstanding -= 1
            self._in_flight[request.adapter] -= 1
            if not self._in_flight[request.adapter]:  # a name unloaded since is never counted again: no zero kept for it
                del self._in_flight[request.adapter]

    def _drop(self, rows: list[int]) -> None:
        """Removes the requests at ``rows`` from the batch (their KV kept in the prefix cache, if any), and
        the padding columns no row needs."""
        keep = [i for i in range(len(self._running)) if i not in set(rows)]
        depths = self._depths(self._running)
        if self.prefix_cache is not None:
            self._store_prefixes(rows, depths)
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = self._mask = self._next = None
            return
        self._mask, self._next = self._mask[keep], self._next[keep]
        start = int((self._mask.cumsum(-1) == 0).sum(-1).min())  # columns that are padding on every row
        self._mask = self._mask[:, start:]
        _keep_rows(self._cache, keep, depths, start)

    def _depths(self, requests: list[Request]) -> list[int]:
        """The level rows each request's policy runs beside its frozen row (an adapter 1, a stack more, the base none)."""
        return [self.adapter_set.depth(r.adapter) for r in requests]

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Whether the engine ran out of work within ``timeout`` seconds (for tests and benchmarks): no
        request outstanding and its batch dropped (a request is told it ended before its batch lets it
        go and keeps its prefix)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._outstanding and not self._running:
                return True
            time.sleep(0.01)
        return False


def completion_text(tokenizer, request: Request, final: bool) -> str:
    """The completion's text, decoding only its newest tokens: the window starts at the tokens of the
    last piece of text taken (so a token's leading space, or a character split over tokens, comes out
    as in a decode of the whole; a character still incomplete waits, unless ``final``), and a step
    costs the same however long the answer is. The first window starts after the prompt's last token:
    a SentencePiece decoder (Llama-2's, Mistral's) strips the leading space of a text's first token, and
    the prompt and its completion read as one text (as vLLM's do)."""
    prefix, read = request.decoded
    context = request.prompt[-1:] if prefix == 0 else []
    if context and tokenizer.decode(context, skip_special_tokens=True).endswith("\ufffd"):
        context = []  # a prompt ending inside a character: its answer may complete it
    before = tokenizer.decode(context + request.tokens[prefix:read], skip_special_tokens=True)
    after = tokenizer.decode(context + request.tokens[prefix:], skip_special_tokens=True)
    if len(after) > len(before) and (final or not after.endswith("\ufffd")):
        request.text += after[len(before):]
        request.decoded = (read, len(request.tokens))
    return request.text


def _keep_rows(cache, keep: list[int], depths: list[int], start: int = 0) -> None:
    """Keeps, in ``cache`` over the rows of requests whose policies run ``depths`` level rows each (the
    frozen rows of all, then each request's level rows: :class:`~qadapter.library.adapter_set.BankRows`),
    the rows of the requests at ``keep`` (in that order; one named twice is copied), and its positions
    from ``start`` on."""
    first = list(itertools.accumulate(depths, initial=len(depths)))  # each request's first level row
    index = keep + [row for i in keep for row in range(first[i], first[i] + depths[i])]
    index = torch.tensor(index, device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]


def _prompt_entries(request: Request, scores) -> list[tuple]:
    """The log-prob entries of an echoed prompt's tokens after the first (``scores``: their
    :class:`~qadapter_kernels.TokenMeasures` under the request's policy), as :func:`_logprob_entries` gives them."""
    k = request.logprobs  # the read may have listed more, for another request of the same prompt
    return [(token, taken, tuple(zip(ids[:k], values[:k])))
            for token, taken, ids, values in zip(request.prompt[1:], scores.combined.tolist(), scores.top_ids.tolist(),
                                                 scores.top_logprobs.tolist())]


def _logprob_entries(requests: list[Request], next_scores: torch.Tensor, tokens: list[int]) -> list[tuple | None]:
    """Each request's entry for the token it takes (None where it asks for no log-probs): the token,
    its log-prob and its request's ``k`` likeliest tokens with theirs, in one gather and one top-k
    (the scores normalized: a base row's are logits)."""
    rows = [i for i, r in enumerate(requests) if r.logprobs is not None]
    entries: list[tuple | None] = [None] * len(requests)
    if not rows:
        return entries
    index = torch.tensor(rows, device=next_scores.device)
    scores = next_scores.index_select(0, index).float().log_softmax(-1)
    taken = scores.gather(1, torch.tensor([[tokens[i]] for i in rows], device=next_scores.device))[:, 0].tolist()
    k = max(requests[i].logprobs for i in rows)
    top_values, top_tokens = scores.topk(k, dim=-1) if k else (scores[:, :0], scores[:, :0].long())
    for j, (i, values, ids) in enumerate(zip(rows, top_values.tolist(), top_tokens.tolist())):
        kept = requests[i].logprobs
        entries[i] = (tokens[i], taken[j], tuple(zip(ids[:kept], values[:kept])))
    return entries


def _unsent_logprobs(request: Request) -> dict:
    """``{"logprobs": entries}`` of the tokens taken since the last event (and none are left), or {}."""
    if request.logprobs is None:
        return {}
    entries, request.unsent_logprobs = request.unsent_logprobs, []
    return {"logprobs": entries}


def _token_id(value, vocab: int) -> bool:
    """Whether ``value`` is a token id of a model with ``vocab`` tokens (a numpy integer too)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 <= value < vocab


def _sampling_expectations(request: Request, vocab: int) -> dict[str, tuple[bool, str]]:
    """Each decoding option of ``request`` (of a model with ``vocab`` tokens): whether its value can
    run, and what it must be."""
    def real(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    return {
        "temperature": (real(request.temperature) and request.temperature >= 0, "a number >= 0 (0: greedy)"),
        "top_k": (integer(request.top_k) and request.top_k >= 0, "an integer >= 0 (0: off)"),
        "top_p": (real(request.top_p) and 0 < request.top_p <= 1, "a number in (0, 1]"),
        "min_p": (real(request.min_p) and 0 <= request.min_p <= 1, "a number in [0, 1]"),
        "repetition_penalty": (real(request.repetition_penalty) and request.repetition_penalty > 0,
                               "a number > 0 (1: off)"),
        "frequency_penalty": (real(request.frequency_penalty), "a finite number"),
        "presence_penalty": (real(request.presence_penalty), "a finite number"),
        "logprobs": (request.logprobs is None or (integer(request.logprobs) and request.logprobs >= 0),
                     "an integer >= 0 (the likeliest tokens to list) or None"),
        "echo": (isinstance(request.echo, bool), "true or false"),
        "logit_bias": (isinstance(request.logit_bias, dict) and all(
            integer(t) and 0 <= t < vocab and real(b) and -100 <= b <= 100 for t, b in request.logit_bias.items()),
            f"a map of token ids in [0, {vocab}) to numbers in [-100, 100]"),
        "seed": (request.seed is None or (integer(request.seed) and 0 <= request.seed < 2**64),
                 "an integer in [0, 2**64) (a torch seed) or None"),
    }


def _penalized(request: Request) -> bool:
    return (request.repetition_penalty != 1 or request.frequency_penalty != 0
            or request.presence_penalty != 0 or bool(request.logit_bias))


def penalize(request: Request, scores: torch.Tensor) -> torch.Tensor:
    """``scores [1, V]`` (a row's log-probs) after the request's penalties: transformers' repetition
    penalty over the prompt and answer tokens (as its ``generate`` applies it), then OpenAI's over the
    answer tokens, ``score[t] -= frequency_penalty * count(t) + presence_penalty * (count(t) > 0)``,
    then OpenAI's ``logit_bias`` added to its tokens' scores."""
    if request.repetition_penalty != 1:
        from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

        seen = torch.tensor([request.prompt + request.tokens], device=scores.device)
        scores = RepetitionPenaltyLogitsProcessor(float(request.repetition_penalty))(seen, scores)
    if (request.frequency_penalty or request.presence_penalty) and request.tokens:
        counts = torch.bincount(torch.tensor(request.tokens, device=scores.device), minlength=scores.shape[-1])
        penalty = request.frequency_penalty * counts + request.presence_penalty * (counts > 0)
        scores = scores - penalty.to(scores.dtype)
    if request.logit_bias:
        tokens = torch.tensor(list(request.logit_bias), device=scores.device)
        bias = torch.tensor(list(request.logit_bias.values()), device=scores.device, dtype=scores.dtype)
        scores = scores.index_add(1, tokens, bias.unsqueeze(0))
    return scores


def _draw(request: Request, scores: torch.Tensor) -> torch.Tensor:
    """A token drawn with the request's generator from ``scores [1, V]`` under its warpers, in the
    order transformers' ``generate`` applies them."""
    from transformers.generation import logits_process as lp

    scores = lp.TemperatureLogitsWarper(float(request.temperature))(None, scores)
    if request.top_k > 0:
        scores = lp.TopKLogitsWarper(request.top_k)(None, scores)
    if request.top_p < 1:
        scores = lp.TopPLogitsWarper(float(request.top_p))(None, scores)
    if request.min_p > 0:
        scores = lp.MinPLogitsWarper(float(request.min_p))(None, scores)
    return torch.multinomial(F.softmax(scores, dim=-1), 1, generator=request.generator)[0, 0]


def attends_in_window(model) -> bool:
    """Whether ``model`` attends within a sliding window on some layer (transformers' cache layout for it)."""
    from transformers import DynamicCache

    return any(layer.is_sliding for layer in DynamicCache(config=model.config).layers)


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """``tensor`` ([B, T] masks or [B, H, T, D] cache states) with zeros on the left up to ``width`` positions."""
    dim = 1 if tensor.dim() == 2 else 2
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _held_back(text: str, stops: tuple[str, ...], sent: int = 0) -> int:
    """How much of ``text`` is final: all but a tail that may begin a stop string and a character
    whose bytes are still arriving. Such a tail starts after the ``sent`` characters (a start in them
    would have been held back), so a step's work is bounded by what is unsent, not the stops' lengths."""
    unsent = len(text) - sent
    hold = max((k for stop in stops for k in range(1, min(len(stop), unsent + 1)) if text.endswith(stop[:k])),
               default=0)
    end = len(text) - hold
    return end - 1 if text[:end].endswith("\ufffd") else end
