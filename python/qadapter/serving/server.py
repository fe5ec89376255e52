"""An OpenAI-compatible HTTP server for the customized policies of an adapter set (``qadapter serve``).

``/v1/completions`` and ``/v1/chat/completions`` (streamed as server-sent events when ``stream`` is
true), ``/v1/models`` listing the base and the loaded adapters (``/v1/models/{id}`` one of them),
``/health`` for probes, ``/metrics`` for Prometheus (:mod:`qadapter.serving.metrics`). A request's
``model`` names an adapter or the base; requests to different adapters share one running batch
(:mod:`qadapter.serving.engine`).
Starlette routes, uvicorn serves; a bad request gets a 4xx answer in OpenAI's error shape, naming the
field, and a client that goes away mid-stream has its request dropped from the batch. With adapter
updates allowed, ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's routes and
bodies) load and unload adapters while the server runs. With an adapter directory, a request for a
model that is a folder there loads it on first use (vLLM's filesystem resolver), at most
``max_adapters`` of them at once: the least recently used idle one makes room.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from qadapter_kernels.config import check_integer

from ..library.data import check_template_options, message_text, text_start_token
from ..library.saved import AdapterLoadError, read_adapter_config
from .engine import AdapterBusy, Engine, EngineStopped, Request, RequestRefused
from .metrics import CONTENT_TYPE

BASE_MODEL = "base"  # the model name that decodes the frozen base alone
# The request fields each route takes: (those it implements -- OpenAI's, and vLLM's names for the other
# sampling options of ``qadapter generate``: top_k, min_p, repetition_penalty --, those that cannot
# change the answer whatever their value -- OpenAI's bookkeeping, caching and latency hints, and
# ``parallel_tool_calls``, which only matters with ``tools`` -- and the UNSUPPORTED ones, taken only at
# their do-nothing values). Any other field is refused by name, never silently ignored.
FIELDS = {
    "completions": (("model", "prompt", "max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty",
                     "top_k", "min_p", "repetition_penalty", "stop", "seed", "n", "logprobs", "echo", "stream",
                     "stream_options", "logit_bias", "add_special_tokens"),
                    ("user",),
                    ("best_of", "suffix")),
    "chat": (("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "frequency_penalty",
              "presence_penalty", "top_k", "min_p", "repetition_penalty", "stop", "seed", "n", "logprobs",
              "top_logprobs", "stream", "stream_options", "logit_bias", "chat_template_kwargs"),
             ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
              "prompt_cache_options", "prompt_cache_retention", "prediction", "parallel_tool_calls"),
             ("tools", "tool_choice", "functions", "function_call", "response_format")),
}
MAX_CHOICES = 128  # OpenAI's bound on n
MAX_PROMPTS = 2048  # prompts in one completions request (OpenAI's bound on a list of prompts)
MAX_ANSWERS = MAX_PROMPTS  # answers one request asks for: its prompts times n
# A stop string's length: each decoding step of every request holds back the text that may begin one.
MAX_STOP_CHARS = 256
MAX_BODY_BYTES = 32 * 2**20  # a request body's size, unless the server is told otherwise
# A JSON escape of a UTF-16 surrogate: where the body has one, its text is checked for a lone one.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on chat's top_logprobs (its completions stop at 5; vLLM's at 20)
MAX_SEED = 2**63 - 1  # OpenAI's seeds are 64-bit signed; choice i samples with seed + i, still a torch seed
# OpenAI request fields that would change the answer and that this server does not implement, with
# the values that ask for nothing: set to anything else they are refused, never silently ignored.
UNSUPPORTED = {"best_of": (1,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
               "function_call": ("none",), "response_format": ({"type": "text"},)}
CHAT_ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _error(message: str, status: int, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


async def _no_route(http: HttpRequest, exc: HTTPException) -> JSONResponse:
    """Starlette's refusals of a path no route has (404) or a method its route does not take (405), in
    the error shape of the others, so that a client reads them as it reads any error."""
    if exc.status_code == 405:
        message = f"{http.method} is not allowed on {http.url.path}; it takes {exc.headers['Allow']}"
    else:
        message = f"no route {http.url.path}; the routes: {', '.join(route.path for route in http.app.routes)}"
    response = _error(message, exc.status_code)
    response.headers.update(exc.headers or {})
    return response


def _number(body: dict, name: str, default: float, low: float, high: float = math.inf,
            low_open: bool = False) -> float:
    """``body[name]`` (``default`` when absent or null) as a float, refused by name unless a finite
    number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    value = body.get(name, default)
    if value is None:
        return default
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an integer beyond any float
            number = float(value)
    if not (math.isfinite(number) and (low < number if low_open else low <= number) and number <= high):
        bound = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf else
                 f"in {'(' if low_open else '['}{low:g}, {high:g}]")
        raise BadRequest(f"{name} must be a number {bound}; got {value!r}", name)
    return number


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    """OpenAI's ``logit_bias``: token ids (JSON keys, so strings of digits) to biases in [-100, 100]."""
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if isinstance(bias, dict) and all(isinstance(k, str) and k.isascii() and k.isdigit() and int(k) < vocab
                                      for k in bias) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and -100 <= v <= 100
            for v in bias.values()):
        return {int(k): float(v) for k, v in bias.items()}
    raise BadRequest(f"logit_bias must map token ids in [0, {vocab}) to numbers in [-100, 100]; got "
                     f"{json.dumps(bias)}", "logit_bias")


def _int(body: dict, name: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise BadRequest(f"{name} must be an integer {bound}; got {value!r}", name)
    return value


class Server:
    """The routes over one :class:`~qadapter.serving.engine.Engine`."""

    def __init__(self, engine: Engine, *, default_max_tokens: int = 256, allow_adapter_updates: bool = False,
                 adapter_dir: str | os.PathLike | None = None, max_adapters: int | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, default_template_options: dict | None = None) -> None:
        max_body_bytes = check_integer("max_body_bytes", max_body_bytes, least=1)
        # else each chat request without max_tokens would be refused as if its client had sent the value
        default_max_tokens = check_integer("default_max_tokens", default_max_tokens, least=1)
        if not isinstance(allow_adapter_updates, bool):  # the string "no" would open the update routes
            raise ValueError(f"allow_adapter_updates must be True or False; got {allow_adapter_updates!r}")
        if adapter_dir is not None and not Path(adapter_dir).is_dir():
            raise ValueError(f"adapter_dir must be a directory of saved adapters; got {str(adapter_dir)!r}")
        if max_adapters is not None and (adapter_dir is None or not isinstance(max_adapters, int)
                                         or isinstance(max_adapters, bool) or max_adapters < 1):
            raise ValueError("max_adapters bounds the adapters loaded from adapter_dir: an int >= 1 with "
                             f"adapter_dir; got {max_adapters!r}" + ("" if adapter_dir else " without adapter_dir"))
        # Every chat's template options under those of its adapter (vLLM's --default-chat-template-kwargs).
        self.default_template_options = check_template_options(default_template_options, "default_template_options")
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.default_max_tokens = default_max_tokens
        self.allow_adapter_updates = allow_adapter_updates
        self.adapter_dir = None if adapter_dir is None else Path(adapter_dir)
        self.max_adapters = max_adapters
        self.max_body_bytes = max_body_bytes
        self._started = time.time()  # /v1/models' created of the base and of the adapters loaded before it
        # The adapters loaded from adapter_dir, least recently asked for first; a load or an eviction
        # holds the lock, and so does a request for one of them until it is queued (so it keeps its model).
        self._from_dir: OrderedDict[str, None] = OrderedDict()
        self._dir_lock = asyncio.Lock()
        # The most characters a token can stand for: a text longer than the context's tokens of them can hold
        # is refused before it is tokenized.
        context = engine.context_length
        longest = max(map(len, self.tokenizer.get_vocab()), default=1)
        self._max_text = None if context is None else context * longest
        # A token's text and bytes, for log-probs (the vocabulary bounds the caches).
        self._token_text = functools.lru_cache(maxsize=None)(token_text(self.tokenizer))
        self._token_bytes = functools.lru_cache(maxsize=None)(token_bytes(self.tokenizer))
        self._text_start = text_start_token(self.tokenizer)  # the BOS a text prompt starts with, or None

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app):
            yield
            self.engine.stop()

        updates = [Route("/v1/load_lora_adapter", self.load_adapter, methods=["POST"]),
                   Route("/v1/unload_lora_adapter", self.unload_adapter, methods=["POST"])]
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            *(updates if self.allow_adapter_updates else []),
        ]
        counted = Middleware(_CountedResponses, counter=self.engine.metrics.http_requests, routes=routes)
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: _no_route, 405: _no_route},
                         middleware=[counted])

    @property
    def model_names(self) -> list[str]:
        return [BASE_MODEL, *self.engine.adapter_set.names]

    async def health(self, request: HttpRequest):
        """200 while the engine takes requests, 503 when it does not (a load balancer's probe, as vLLM's):
        stopped or not started. After Ctrl-C uvicorn accepts no connection, so a probe fails to connect;
        only a connection already open still reads the 503, for an instant."""
        if self.engine.serving:
            return PlainTextResponse("")
        return _error("the engine is not running (stopped, or shutting down)", 503)

    async def metrics(self, request: HttpRequest) -> Response:
        """The engine's metrics in Prometheus' text format (vLLM's names, ``qadapter:`` for ``vllm:``)."""
        return Response(self.engine.metrics.render(), media_type=CONTENT_TYPE)

    def _model_entry(self, name: str) -> dict:
        """OpenAI's model object (``created``: when it was loaded, the server's start for the base and the
        adapters loaded before), with vLLM's ``root`` (where a model's weights come from) and ``parent``
        (an adapter's model: the base) and the context length."""
        served = {a.name: a for a in self.engine.adapter_set.adapters}.get(name)
        base = getattr(self.engine.adapter_set.base_model.config, "name_or_path", None) or None
        return {"id": name, "object": "model", "created": int(max(served.loaded_at if served else 0, self._started)),
                "owned_by": "qadapter", "root": str(served.path) if served else base,
                "parent": None if name == BASE_MODEL else BASE_MODEL, "max_model_len": self.engine.context_length}

    async def models(self, request: HttpRequest) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model_entry(name) for name in self.model_names]})

    async def model(self, request: HttpRequest) -> JSONResponse:
        """OpenAI's model retrieval: one model of the list, by its id."""
        name = request.path_params["model"]
        if name not in self.model_names:
            exc = self._unknown_model(name)
            return _error(str(exc), exc.status, exc.param, exc.code)
        return JSONResponse(self._model_entry(name))

    def _unknown_model(self, name: str) -> BadRequest:
        """The 404 for a model that is not loaded: the loaded ones, and where others come from."""
        where = "" if self.adapter_dir is None else (
            ", or a folder of the server's adapter directory (a saved adapter, loaded on first use)")
        return BadRequest(f"model {name!r} does not exist; available: {self.model_names}{where}", "model", 404,
                          "model_not_found")

    async def completions(self, request: HttpRequest):
        return await self._complete(request, chat=False)

    async def chat_completions(self, request: HttpRequest):
        return await self._complete(request, chat=True)

    # ------------------------------------------------------------------------------ adapters
    async def load_adapter(self, http: HttpRequest):
        """vLLM's ``{"lora_name", "lora_path"}``: the path is a saved adapter's folder on the server's
        machine or a hub repository; the running batch goes on while it loads."""
        try:
            name, path = self._adapter_fields(await self._body(http), ("lora_name", "lora_path"))
            if name == BASE_MODEL or name in self.engine.adapter_set.names:
                raise BadRequest(f"lora_name {name!r} is {'the base' if name == BASE_MODEL else 'loaded already'}",
                                 "lora_name")
            await asyncio.to_thread(self.engine.load_adapter, name, path)
        except BadRequest as exc:
            return _error(str(exc), exc.status, exc.param, exc.code)
        except (ValueError, OSError) as exc:  # AdapterLoadError (not an adapter, another base), unreadable files
            return _error(f"lora_path {path!r}: {exc}", 400, "lora_path")
        except EngineStopped as exc:
            return _error(str(exc), 503)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, http: HttpRequest):
        """vLLM's ``{"lora_name"}``; refused (409) while requests for that adapter are queued or running."""
        try:
            (name,) = self._adapter_fields(await self._body(http), ("lora_name",))
            if name not in self.engine.adapter_set.names:
                raise BadRequest(f"lora_name {name!r} is not loaded; loaded: {self.engine.adapter_set.names}",
                                 "lora_name", 404)
            await asyncio.to_thread(self.engine.unload_adapter, name)
        except BadRequest as exc:
            return _error(str(exc), exc.status, exc.param, exc.code)
        except AdapterBusy as exc:
            return _error(str(exc), 409, "lora_name")
        except KeyError as exc:  # unloaded by another request meanwhile
            return _error(str(exc).strip("'\""), 404, "lora_name")
        except EngineStopped as exc:
            return _error(str(exc), 503)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    def _in_adapter_dir(self, model: object) -> Path | None:
        """The folder of ``adapter_dir`` a request's ``model`` names (one path component, not hidden), or None."""
        if self.adapter_dir is None or not isinstance(model, str) or model == BASE_MODEL:
            return None
        if not model or model.startswith(".") or any(c in model for c in ("/", "\\", "\0", ":")):
            return None
        folder = self.adapter_dir / model
        try:
            return folder if folder.is_dir() else None
        except OSError:  # a name too long for the file system (Python before 3.12 raises for it)
            return None

    async def _load_from_dir(self, model: object) -> None:
        """Loads a request's ``model`` from the adapter directory where it is a folder there and not
        loaded, first unloading the least recently used idle adapter from there when ``max_adapters``
        are loaded. Returns holding nothing: the caller queues its request before it next awaits, so
        no eviction comes between (an adapter with queued requests is not unloaded)."""
        if not isinstance(model, str) or (model in self.engine.adapter_set.names and model not in self._from_dir):
            return  # not a name, or an adapter loaded otherwise (at start, by the route): never unloaded here
        folder = self._in_adapter_dir(model)
        if folder is None:
            return
        async with self._dir_lock:
            if model in self.engine.adapter_set.names:
                self._from_dir.move_to_end(model)
                return
            self._from_dir.pop(model, None)  # unloaded by the route meanwhile
            try:  # a folder that cannot load costs no loaded adapter its place
                await asyncio.to_thread(self.engine.adapter_set.check, folder)
                while self.max_adapters is not None and len(self._from_dir) >= self.max_adapters:
                    await self._evict()
                await asyncio.to_thread(self.engine.load_adapter, model, folder)
            except (ValueError, OSError) as exc:  # AdapterLoadError (not an adapter, another base), unreadable files
                raise BadRequest(f"model {model!r}: the folder {model!r} of the adapter directory holds no adapter "
                                 f"this server can load: {exc}", "model") from exc
            self._from_dir[model] = None

    async def _evict(self) -> None:
        """Unloads the least recently used adapter from the adapter directory that no request waits for."""
        for name in list(self._from_dir):
            try:
                await asyncio.to_thread(self.engine.unload_adapter, name)
            except AdapterBusy:
                continue
            except KeyError:  # unloaded by the route meanwhile
                pass
            del self._from_dir[name]
            return
        raise BadRequest(f"all {self.max_adapters} adapters loaded from the adapter directory have requests "
                         "running (max_adapters); try again when one finishes", "model", 503)

    @staticmethod
    def _adapter_fields(body: dict, names: tuple[str, ...]) -> list[str]:
        """The string fields ``names`` of an adapter update's body, which holds nothing else."""
        unknown = sorted(set(body) - set(names))
        if unknown:
            raise BadRequest(f"unknown field {unknown[0]!r}: this route takes {list(names)}", unknown[0])
        for name in names:
            if not isinstance(body.get(name), str) or not body[name]:
                raise BadRequest(f"{name} must be a non-empty string; got {body.get(name)!r}", name)
        return [body[name] for name in names]

    # ------------------------------------------------------------------------------ requests
    async def _complete(self, http: HttpRequest, chat: bool):
        arrived = time.monotonic()  # its latency metrics count its reading, tokenizing and any adapter load
        try:
            body = await self._body(http)
            # Tokenized off the event loop (a long prompt would hold every stream), before the model is in hand.
            prompts = await asyncio.to_thread(
                lambda: [(self._chat_prompt(body), "", 0)] if chat else self._text_prompts(body, body.get("echo") is True))
            choices = _int(body, "n", 1, 1, MAX_CHOICES)
            answers = len(prompts) * choices
            if answers > MAX_ANSWERS:  # before a model is loaded for it
                raise BadRequest(f"n times the prompts asks for {answers} answers; a request gets at most "
                                 f"{MAX_ANSWERS}", "n")
            options, stream, usage_chunk, limit = self._options(body, chat)  # all checked before a model loads for it
            await self._load_from_dir(body.get("model"))  # no await after it until the requests are queued
            self._check_model(body.get("model"))
        except BadRequest as exc:
            return _error(str(exc), exc.status, exc.param, exc.code)
        except EngineStopped as exc:  # while it loaded an adapter from the adapter directory
            return _error(str(exc), 503)
        events: asyncio.Queue = asyncio.Queue()  # (choice index, event)
        loop = asyncio.get_running_loop()
        seed = options.pop("seed")
        context = self.engine.context_length
        if limit is None and context is not None:  # the default, as vLLM's: no more than the context leaves
            options["max_tokens"] = min(options["max_tokens"], max(1, context - max(len(p) for p, _, _ in prompts)))
        # Choice j * n + i: prompt j's i-th answer (OpenAI's order); seeded choices of a prompt differ.
        requests = [Request(prompt=prompt, seed=None if seed is None else seed + i, **options,
                            emit=lambda event, c=j * choices + i: loop.call_soon_threadsafe(events.put_nowait, (c, event)),
                            submitted_at=arrived, counts_prompt=i == 0)
                    for j, (prompt, _, _) in enumerate(prompts) for i in range(choices)]
        try:
            for request in requests:
                self.engine.submit(request)
        except (RequestRefused, EngineStopped) as exc:
            for request in requests:  # those already queued go
                request.cancelled = True
            if isinstance(exc, EngineStopped):
                return _error(str(exc), 503)
            return _error(str(exc), 400, self._request_field(exc.field, limit, chat))
        reply = _Reply(body["model"], chat, sum(len(ids) for ids, _, _ in prompts), len(requests), usage_chunk,
                       token_text=self._token_text if options["logprobs"] is not None else None,
                       token_bytes=self._token_bytes,  # an added BOS is written (at offset 0) only where the prompt is echoed
                       unwritten=[u if options.get("echo") else 0 for _, _, u in prompts for _ in range(choices)])
        echoed = [text if options.get("echo") else "" for _, text, _ in prompts for _ in range(choices)]  # per choice
        if stream:
            return _ClosingStream(self._stream(requests, events, reply, echoed), media_type="text/event-stream")
        texts, ends, logprobs = [[text] for text in echoed], [None] * len(requests), [[] for _ in requests]
        gone = asyncio.ensure_future(_disconnected(http))  # a client that leaves takes its requests out of the batch
        waiting = None
        try:
            while None in ends:
                waiting = asyncio.ensure_future(events.get())
                await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    return Response(status_code=499)  # nginx's "client closed request": nobody reads it
                index, event = waiting.result()
                logprobs[index] += [*event.get("prompt_logprobs", ()), *event.get("logprobs", ())]
                if "text" in event:
                    texts[index].append(event["text"])
                elif "prompt_logprobs" not in event:
                    ends[index] = event
        finally:
            gone.cancel()
            if waiting is not None:
                waiting.cancel()
            for request, end in zip(requests, ends):
                if end is None:  # the client went away, or the server is stopping: free the rows
                    request.cancelled = True
        failed = [end for end in ends if "error" in end]
        if failed:
            return _error(failed[0]["error"], 500)
        return JSONResponse(reply.whole(["".join(text) for text in texts], ends, logprobs))

    @staticmethod
    def _request_field(field: str, limit: str | None, chat: bool) -> str:
        """The field of the client's request behind the engine's request ``field``: the limit it set
        (``max_tokens`` or ``max_completion_tokens``; a limit it left unset is the context's room,
        so the prompt is at fault), the prompt or messages, the model (an adapter unloaded meanwhile)."""
        prompt = "messages" if chat else "prompt"
        return {"max_tokens": limit or prompt, "prompt": prompt, "adapter": "model"}.get(field, field)

    async def _stream(self, requests: list[Request], events: asyncio.Queue, reply: _Reply, echoed: list[str]):
        ends: list[dict | None] = [None] * len(requests)
        try:
            if reply.chat:
                for index in range(len(requests)):
                    yield _sse(reply.chunk(index, {"role": "assistant", "content": ""}, None))
            elif reply.token_text is None:  # an echoed prompt without log-probs goes first, at once
                for index, text in enumerate(echoed):
                    if text:
                        yield _sse(reply.chunk(index, text, None))
            while None in ends:
                index, event = await events.get()
                if "prompt_logprobs" in event:  # an echoed prompt, with its tokens' log-probs
                    yield _sse(reply.chunk(index, echoed[index], None, logprobs=event["prompt_logprobs"]))
                    continue
                if "text" in event:
                    yield _sse(reply.chunk(index, event["text"], None, logprobs=event.get("logprobs")))
                    continue
                ends[index] = event
                if "error" in event:
                    yield _sse({"error": {"message": event["error"], "type": "server_error"}})
                    break
                finish = reply.chunk(index, "" if not reply.chat else {}, event["finish_reason"],
                                     logprobs=event.get("logprobs"))
                yield _sse(finish)
                if None not in ends and reply.usage_chunk:  # include_usage: OpenAI's last chunk, usage and no choices
                    yield _sse({**finish, "choices": [], "usage": reply.usage(ends)})
            yield "data: [DONE]\n\n"
        finally:
            for request, end in zip(requests, ends):
                if end is None:  # the client went away, the server is stopping, or a choice failed: free the rows
                    request.cancelled = True

    async def _body(self, http: HttpRequest) -> dict:
        """The request's JSON object, read up to ``max_body_bytes`` (413 past them), its text valid Unicode."""
        too_large = BadRequest(f"the request body is larger than this server takes ({self.max_body_bytes} bytes, "
                               "qadapter serve --max-body-size)", status=413)
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        raw = bytearray()
        async for chunk in http.stream():
            raw += chunk
            if len(raw) > self.max_body_bytes:
                raise too_large
        try:
            text = raw.decode("utf-8")  # strictly: json.loads would take bytes in UTF-16, or a surrogate encoded
            body = json.loads(text)
        except RecursionError as exc:
            raise BadRequest("the request body is not valid JSON here: nested too deeply") from exc
        except ValueError as exc:  # not UTF-8, not JSON, an integer of more digits than Python reads
            raise BadRequest(f"the request body is not valid JSON in UTF-8: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        if SURROGATE_ESCAPE.search(text):  # a pair is one character; one alone is no text
            try:
                json.dumps(body, ensure_ascii=False).encode()
            except UnicodeEncodeError as exc:
                raise BadRequest("the request body's text holds a lone UTF-16 surrogate (an escape \\ud800-\\udfff "
                                 "without its pair): text must be valid Unicode") from exc
        return body

    def _check_model(self, model: object) -> None:
        if not isinstance(model, str):
            raise BadRequest(f"model must name one of {self.model_names}; got {model!r}", "model")
        if model not in self.model_names:
            raise self._unknown_model(model)

    def _options(self, body: dict, chat: bool) -> tuple[dict, bool, bool, str | None]:
        """The :class:`~qadapter.serving.engine.Request` options the body sets (each checked, defaults
        as OpenAI's; a null field is an absent one), whether to stream, whether
        the stream ends in a chunk of the usage alone, and the field that set max_tokens (None: the
        default). The model is checked apart, once a folder of the adapter directory it names is loaded."""
        model = body.get("model")
        implemented, harmless, unsupported = FIELDS["chat" if chat else "completions"]
        for name in body:
            if name not in implemented + harmless + unsupported:
                raise BadRequest(f"unsupported field {name!r}: this server takes {', '.join(implemented)}; and, where "
                                 f"they change nothing, {', '.join(harmless + unsupported)}", name)
        for name in unsupported:
            value, defaults = body.get(name), UNSUPPORTED[name]
            if value is not None and not any(value == d and isinstance(value, bool) == isinstance(d, bool)
                                             for d in defaults):
                raise BadRequest(f"{name} is not supported by this server (only {' or '.join(map(json.dumps, defaults))}"
                                 f"); got {json.dumps(value)}", name)
        limit = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        scored_alone = not chat and body.get("echo") is True  # max_tokens 0: the echoed prompt alone
        max_tokens = _int(body, limit, self.default_max_tokens if chat else 16, 0 if scored_alone else 1)
        stop = body.get("stop")
        stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
        if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(
                isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
            raise BadRequest(f"stop must be a string of 1 to {MAX_STOP_CHARS} characters or a list of up to 4 of them; "
                             f"got {str(body.get('stop'))[:80]!r}", "stop")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"stream must be true or false; got {stream!r}", "stream")
        stream_options = body.get("stream_options")
        stream_options = {} if stream_options is None else stream_options  # include_obfuscation: nothing is padded either way
        if not isinstance(stream_options, dict) or not all(
                k in ("include_usage", "include_obfuscation") and isinstance(v, bool) for k, v in stream_options.items()):
            raise BadRequest("stream_options must be an object whose include_usage and include_obfuscation are true or "
                             f"false; got {json.dumps(stream_options)}", "stream_options")
        if body.get("stream_options") is not None and not stream:  # as OpenAI's and vLLM's: no stream, no options
            raise BadRequest("stream_options is only allowed with stream=true", "stream_options")
        top_k = _int(body, "top_k", 0, -1)  # -1: off, as vLLM has it (and 0, as transformers has it)
        if chat:  # logprobs: true asks for them, top_logprobs for that many alternatives
            wanted = body.get("logprobs") or False
            if not isinstance(wanted, bool):
                raise BadRequest(f"logprobs must be true or false; got {json.dumps(body.get('logprobs'))}", "logprobs")
            top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
            if top is not None and not wanted:
                raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
            logprobs = (top or 0) if wanted else None
        else:  # logprobs: the number of alternatives (0: the answer's tokens alone)
            logprobs = _int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
            echo = body.get("echo") or False
            if not isinstance(echo, bool):
                raise BadRequest(f"echo must be true or false; got {json.dumps(body.get('echo'))}", "echo")
        options = dict(adapter=None if model == BASE_MODEL else model, max_tokens=max_tokens,
                    temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                    top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True), top_k=max(top_k, 0),
                    min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
                    repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, low_open=True),
                    frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
                    presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0), stop=tuple(stop),
                    seed=_int(body, "seed", None, 0, MAX_SEED), logprobs=logprobs,
                    logit_bias=_logit_bias(body, self.engine.vocab))
        if not chat:
            options["echo"] = echo
        given = limit if body.get(limit) is not None else None
        return options, stream, stream_options.get("include_usage", False), given

    def _text_prompts(self, body: dict, echo: bool) -> list[tuple[list[int], str, int]]:
        """The prompts' token ids, texts (what ``echo`` returns; token ids are decoded only then) and
        how many of their first tokens that text does not write: OpenAI's ``prompt`` is a string, a list
        of token ids, or a list of either (several prompts, each answered ``n`` times). A text starts
        with the BOS its tokenizer starts texts with (Llama's, Gemma's), as training and ``generate``
        read it, unless ``add_special_tokens`` (vLLM's field) is false; token ids are taken as given."""
        prompt, vocab = body.get("prompt"), len(self.tokenizer)
        add_start = body.get("add_special_tokens")
        if add_start is not None and not isinstance(add_start, bool):
            raise BadRequest(f"add_special_tokens must be true or false; got {json.dumps(add_start)}",
                             "add_special_tokens")
        start = self._text_start if add_start is not False else None

        def ids(one) -> tuple[list[int], str, int] | None:
            if isinstance(one, str) and one:
                self._check_text_length(len(one), "prompt")
                tokens = self.tokenizer(one, add_special_tokens=False).input_ids
                if start is None or tokens[:1] == [start]:  # a text that writes its BOS has it once
                    return tokens, one, 0
                return [start, *tokens], one, 1
            if isinstance(one, list) and one and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                     for t in one):
                return list(one), self.tokenizer.decode(one) if echo else "", 0
            return None

        single = ids(prompt)
        if single is not None:
            return [single]
        several = [ids(one) for one in prompt] if isinstance(prompt, list) and prompt else [None]
        if None in several or len(several) > MAX_PROMPTS:
            raise BadRequest(f"prompt must be a non-empty string, a list of token ids in [0, {vocab}), or a list of up "
                             f"to {MAX_PROMPTS} of either; got {str(prompt)[:80]!r}", "prompt")
        return several

    def _check_text_length(self, characters: int, field: str) -> None:
        """Refuses a text too long for the context whatever its tokens, before tokenizing it."""
        if self._max_text is not None and characters > self._max_text:
            raise BadRequest(f"{field}: {characters} characters are more than the model's context length "
                             f"({self.engine.context_length} tokens) can hold", field)

    def _chat_prompt(self, body: dict) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), (str, list))
                for m in messages):
            raise BadRequest("messages must be a non-empty list of {role, content} objects, each role a string and "
                             "each content a string or a list of text parts", "messages")
        for i, m in enumerate(messages):
            if m["role"] not in CHAT_ROLES:
                raise BadRequest(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {m['role']!r}",
                                 "messages")
            extra = sorted(k for k, v in m.items() if k not in ("role", "content") and v is not None)
            if extra:  # a participant's name, tool calls, ...: the prompt would differ from what was asked
                raise BadRequest(f"messages[{i}] has {', '.join(extra)}: a message here is its role and content only",
                                 "messages")
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest("this model's tokenizer has no chat template: use /v1/completions", "messages")
        try:
            turns = [{"role": m["role"], "content": message_text(m["content"], f"messages[{i}].content")}
                     for i, m in enumerate(messages)]
        except ValueError as exc:  # an image or audio part, a malformed part
            raise BadRequest(str(exc), "messages") from None
        self._check_text_length(sum(len(turn["content"]) for turn in turns), "messages")
        options = self._template_options(body)
        try:
            ids = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                     **options)
        except Exception as exc:  # the template's own refusal (jinja's raise_exception), e.g. no system role
            if body.get("chat_template_kwargs") and self._renders(turns, {**body, "chat_template_kwargs": None}):
                raise BadRequest(f"this model's chat template refuses the chat_template_kwargs: {exc}",
                                 "chat_template_kwargs") from exc
            raise BadRequest(f"this model's chat template refuses the messages: {exc}", "messages") from exc
        return list(ids["input_ids"])

    def _renders(self, turns: list[dict], body: dict) -> bool:
        """Whether the template takes ``turns`` with ``body``'s options: what a refusal is of."""
        try:
            self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False,
                                               **self._template_options(body))
        except Exception:
            return False
        return True

    def _template_options(self, body: dict) -> dict:
        """The chat template's options for a chat: its ``chat_template_kwargs`` (vLLM's field) over those
        the adapter it names was trained with (read from a folder of the adapter directory not loaded
        yet; one that cannot be read is refused when it loads), over the server's defaults."""
        try:
            asked = check_template_options(body.get("chat_template_kwargs"), "chat_template_kwargs")
        except ValueError as exc:
            raise BadRequest(str(exc), "chat_template_kwargs") from None
        model = body.get("model")
        try:
            trained = self.engine.adapter_set.template_options(model if isinstance(model, str) else None)
        except KeyError:  # not loaded (the base's name, a folder of the adapter directory, or unloaded meanwhile)
            trained, folder = {}, self._in_adapter_dir(model)
            if folder is not None:
                with contextlib.suppress(AdapterLoadError):
                    trained = read_adapter_config(folder)["chat_template_kwargs"]
        return {**self.default_template_options, **trained, **asked}


class _CountedResponses:
    """Counts every HTTP response by its route's path (``none`` for a path no route has, so a client
    cannot grow the labels), method and status class, as vLLM's ``http_requests_total`` does: an
    error-rate alert sees the requests refused (4xx) and failed (5xx) too."""

    def __init__(self, app, counter, routes: list[Route]) -> None:
        self.app, self.counter, self.routes = app, counter, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        handler = next((route.path for route in self.routes if route.path_regex.match(scope["path"])), "none")
        method = scope["method"] if scope["method"] in ("GET", "POST") else "other"
        started = False

        async def counted(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counter.labels(handler, method, f"{message['status'] // 100}xx").inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except Exception:
            if not started:  # Starlette answers it with a 500
                self.counter.labels(handler, method, "5xx").inc()
            raise


class _ClosingStream(StreamingResponse):
    """A stream whose generator is closed when the response ends: Starlette (under ASGI before 2.4)
    stops sending to a client that left, but a generator suspended at a ``yield`` then stays so until
    it is collected, its cleanup (which cancels the requests, freeing their batch rows) not run."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client has gone away (its body read, what the server receives next is the
    disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def token_text(tokenizer) -> Callable[[int], str]:
    """A token's text as it reads inside an answer, so that an answer's tokens add up to its text (and
    completions' ``text_offset`` points into it): decoded after an anchor token whose text is then cut
    off, since a SentencePiece decoder (Llama-2's, Mistral's) strips the word-start space of a text's
    first token (``▁Paris`` alone decodes to ``Paris``)."""
    anchor = tokenizer("\n", add_special_tokens=False)["input_ids"][-1:]
    lead = tokenizer.decode(anchor)

    def of(token: int) -> str:
        text = tokenizer.decode(anchor + [token])
        return text[len(lead):] if text.startswith(lead) else tokenizer.decode([token])

    return of


def token_bytes(tokenizer) -> Callable[[int], bytes]:
    """A token's own bytes, as OpenAI's chat log-probs give them: of a character split over tokens,
    each token's share of its UTF-8 (such a token's decoded text is U+FFFD, whose bytes are no part of
    the answer's). Byte-level BPE (GPT-2's, Llama-3's, Qwen's) spells each byte as one character;
    SentencePiece's byte fallback spells one as ``<0xNN>``; any other token, its ``token_text``'s bytes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    byte_level = "ByteLevel" in repr(decoder)  # alone or in a Sequence of decoders
    spelled = {char: byte for byte, char in bytes_to_unicode().items()}
    text = token_text(tokenizer)

    def of(token: int) -> bytes:
        piece = tokenizer.convert_ids_to_tokens(token)
        fallback = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece or "")
        if fallback:
            return bytes([int(fallback[1], 16)])
        if byte_level and piece and token not in tokenizer.all_special_ids and all(c in spelled for c in piece):
            return bytes(spelled[c] for c in piece)
        return text(token).encode()

    return of


class _Reply:
    """The OpenAI shapes of one completion's answer (its ``choices`` choices), whole or in chunks;
    with ``token_text`` (a token's text), the answer tokens' log-probs in each route's shape (a chat's
    with each token's ``token_bytes``)."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, choices: int = 1, usage_chunk: bool = False,
                 token_text: Callable[[int], str] | None = None,
                 token_bytes: Callable[[int], bytes] | None = None, unwritten: list[int] | None = None) -> None:
        self.model, self.chat, self.prompt_tokens, self.usage_chunk = model, chat, prompt_tokens, usage_chunk
        self.token_text, self.token_bytes = token_text, token_bytes
        self.text_offsets = [0] * choices  # completions' text_offset: where each choice's next token starts
        # Per choice, the echoed prompt's first tokens its text does not write (a BOS added to a text
        # prompt): at offset 0, taking no room in the text.
        self.unwritten = list(unwritten or [0] * choices)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def logprobs(self, index: int, entries) -> dict | None:
        """Engine log-prob entries of choice ``index``, in order, in the route's shape (None: not asked for)."""
        if self.token_text is None:
            return None
        text = self.token_text
        if self.chat:
            def alternative(token: int, logprob: float) -> dict:
                return {"token": text(token), "logprob": logprob, "bytes": list(self.token_bytes(token))}
            return {"content": [{**alternative(token, logprob), "top_logprobs": [alternative(*t) for t in top]}
                                for token, logprob, top in entries]}
        tokens = [text(token) for token, _, _ in entries]
        offsets = []
        for token in tokens:
            offsets.append(self.text_offsets[index])
            if self.unwritten[index]:
                self.unwritten[index] -= 1
            else:
                self.text_offsets[index] += len(token)
        alternatives = []  # keyed by text, as OpenAI's format is: of tokens with one text (an incomplete
        for _, _, top in entries:  # character), the likeliest; likeliest first. None: an echoed first token
            alternatives.append(None if top is None else {})
            for token, logprob in top or ():
                alternatives[-1].setdefault(text(token), logprob)
        return {"tokens": tokens, "token_logprobs": [logprob for _, logprob, _ in entries],
                "top_logprobs": alternatives, "text_offset": offsets}

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, ends: list[dict]) -> dict:
        """The prompt once (the choices share it), the completion tokens of every choice."""
        done = sum(end["completion_tokens"] for end in ends)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done, "total_tokens": self.prompt_tokens + done}

    def whole(self, texts: list[str], ends: list[dict], logprobs: list[list]) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": self.logprobs(i, entries), "finish_reason": end["finish_reason"]}
                       for i, (text, end, entries) in enumerate(zip(texts, ends, logprobs))]
            return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(ends)}
        choices = [{"index": i, "text": text, "logprobs": self.logprobs(i, entries), "finish_reason": end["finish_reason"]}
                   for i, (text, end, entries) in enumerate(zip(texts, ends, logprobs))]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage(ends)}

    def chunk(self, index: int, piece: Any, finish_reason: str | None, logprobs: list | None = None) -> dict:
        """One streamed piece of choice ``index``. As OpenAI's, a chunk has a usage (null) only where the
        stream ends in the usage chunk (stream_options.include_usage), and no usage otherwise."""
        entries = None if logprobs is None else self.logprobs(index, logprobs)
        if self.chat:
            delta = piece if isinstance(piece, dict) else {"content": piece}
            out = {**self._head("chat.completion.chunk"),
                   "choices": [{"index": index, "delta": delta, "logprobs": entries, "finish_reason": finish_reason}]}
        else:
            out = {**self._head("text_completion"),
                   "choices": [{"index": index, "text": piece, "logprobs": entries, "finish_reason": finish_reason}]}
        if self.usage_chunk:
            out["usage"] = None
        return out


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, *, grace: float = 5.0,
          log_level: str = "info", allow_adapter_updates: bool = False, adapter_dir: str | os.PathLike | None = None,
          max_adapters: int | None = None, max_body_bytes: int = MAX_BODY_BYTES,
          default_template_options: dict | None = None) -> None:
    """Serves until interrupted. On Ctrl-C (or SIGTERM) new requests are refused, the running ones get
    ``grace`` seconds to finish and are then cancelled (a streaming client reads
    ``finish_reason="cancelled"`` and the end of the stream), and the server exits: by raising
    KeyboardInterrupt after a Ctrl-C (uvicorn's own raise of the signal can come as its loop ends, and
    be lost), or what a SIGTERM handler raises."""
    import signal
    import threading

    import uvicorn

    class _Server(uvicorn.Server):
        signals: tuple[int, ...] = ()  # those it was stopped by

        def handle_exit(self, sig, frame) -> None:
            self.signals += (sig,)
            super().handle_exit(sig, frame)
            threading.Thread(target=engine.stop, args=(grace,), daemon=True).start()

    app = Server(engine, allow_adapter_updates=allow_adapter_updates, adapter_dir=adapter_dir,
                 max_adapters=max_adapters, max_body_bytes=max_body_bytes,
                 default_template_options=default_template_options).app()  # its options checked before the engine starts
    engine.start()
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=grace + 10)
    server = _Server(config)
    server.run()
    if signal.SIGINT in server.signals:
        raise KeyboardInterrupt
