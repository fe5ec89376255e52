"""``qadapter generate`` (one answer, streamed) and ``qadapter serve`` (many customized policies over
one base, over HTTP): decoding with the customized policy."""

from __future__ import annotations

import sys
from pathlib import Path

from .arguments import (
    ADAPTER_HELP,
    add_base_model_option,
    add_dtype_option,
    add_quantization_options,
    add_template_options,
    dtype_from,
    non_empty_text,
    non_negative_int,
    port_number,
    positive_float,
    positive_int,
    probability,
    quantization_from,
    template_options,
    torch_seed,
    unit_fraction,
    usage_error,
    utf8_text,
)


def generate_parser(p) -> None:
    p.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    p.add_argument("--prompt", required=True, type=utf8_text, help="the user message")
    add_base_model_option(p)
    p.add_argument("--max-new-tokens", type=positive_int, default=128, help="tokens generated at most (default: %(default)s)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, help="with --sample (default: 1.0)")
    p.add_argument("--top-k", type=non_negative_int, help="with --sample: keep the k most likely tokens (default 0: all)")
    p.add_argument("--top-p", type=probability, help="with --sample (default: 1.0)")
    p.add_argument("--min-p", type=unit_fraction,
                   help="with --sample: drop tokens below min_p times the top one's probability (0: none)")
    p.add_argument("--repetition-penalty", type=positive_float, default=None,
                   help="transformers' penalty (> 0) on the prompt's and the answer's tokens (default: none)")
    p.add_argument("--num-beams", type=positive_int, default=1,
                   help="beam search over the customized policy with this many beams (the answer is printed "
                        "when the search ends: beams do not stream)")
    p.add_argument("--stop", action="append", type=non_empty_text, default=None, metavar="TEXT",
                   help="stop when the answer contains TEXT (repeatable)")
    p.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                   help="static cache and compiled decode step (auto: on CUDA)")
    p.add_argument("--seed", type=torch_seed, help="with --sample: the seed of the draws (default: 0)")
    add_template_options(p)
    add_quantization_options(p, "load the base (default: as the adapter was trained)")
    add_dtype_option(p)


# What --sample draws with where its options are not given (no filter).
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None}


def generate_command(args) -> int:
    import torch
    from transformers import TextStreamer

    from ..evaluation.measures import chat_prompts
    from ..library.model import QAdapterModel
    from ..library.policy import end_token_ids

    given = {name: getattr(args, name) for name in SAMPLING_DEFAULTS if getattr(args, name) is not None}
    if not args.sample and (given or args.seed is not None):
        named = [f"--{name.replace('_', '-')}" for name in given] + ["--seed"] * (args.seed is not None)
        usage_error("generate", f"{', '.join(named)} {'applies' if len(named) == 1 else 'apply'} only with "
                                "--sample (greedy decoding takes no sampling options)")
    model = QAdapterModel.from_pretrained(args.adapter, args.base_model, quantization=quantization_from(args, "saved"),
                                          torch_dtype=dtype_from(args))
    tokenizer = model.tokenizer
    prompts = chat_prompts(tokenizer, [args.prompt], {**model.chat_template_kwargs, **args.chat_template_kwargs})
    enc = tokenizer(prompts, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(args.seed or 0)
    sampling = {**SAMPLING_DEFAULTS, **given} if args.sample else {}
    streams = args.num_beams == 1
    out = model.generate(enc.input_ids, enc.attention_mask, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         **sampling, repetition_penalty=args.repetition_penalty, stop_strings=args.stop,
                         num_beams=args.num_beams, eos_token_id=end_token_ids(model.base_model, tokenizer),
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                         streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if streams else None,
                         compiled={"auto": None, "yes": True, "no": False}[args.compile])
    if not streams:
        print(tokenizer.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    return 0


# The prefix cache's budget where --prefix-cache is not given.
PREFIX_CACHE = "1GiB"
# The largest request body where --max-body-size is not given (qadapter.serving.server.MAX_BODY_BYTES).
MAX_BODY = "32MiB"


def serve_parser(p) -> None:
    p.description = ("Serves /v1/completions, /v1/chat/completions (streaming by server-sent events), "
                     "/v1/models, /health and /metrics (Prometheus). A request's model names a loaded "
                     "adapter, or 'base' for the frozen base alone; requests to different adapters "
                     "decode in one running batch.")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=ADAPTER",
                   help="serve the saved Q-Adapter ADAPTER (a directory, or a hub repository owner/name[@revision]; "
                        "a stacked one too) as model NAME (repeatable)")
    add_base_model_option(p, "the base (default: the one the adapters name; without adapters, the embedded default)")
    add_dtype_option(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    p.add_argument("--port", type=port_number, default=8000, help="the port to listen on (default: %(default)s)")
    p.add_argument("--max-batch", type=positive_int, default=32,
                   help="requests decoded together at most (default: %(default)s)")
    p.add_argument("--max-prefill-tokens", type=positive_int, metavar="N",
                   help="prompt tokens (times the rows each request runs: 2 for an adapter, 1 + levels for a "
                        "stack) read in one prefill at most, bounding its memory; a longer prompt is read alone "
                        "(default: no bound)")
    p.add_argument("--prefix-cache", metavar="SIZE",
                   help="keep finished requests' KV cache, at most SIZE (e.g. 2GiB, 500MiB; 0: off), and read a "
                        "prompt that starts the same way under the same model from where it differs (a shared "
                        f"system prompt, a chat's next turn) (default: {PREFIX_CACHE}; off for a model that "
                        "attends within a sliding window, Gemma-2 or Mistral, which refuses a SIZE)")
    p.add_argument("--max-body-size", metavar="SIZE", default=MAX_BODY,
                   help=f"refuse (413) a request body larger than SIZE (e.g. 64MiB) (default: {MAX_BODY})")
    p.add_argument("--allow-adapter-updates", action="store_true",
                   help="take POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's): any client that "
                        "reaches the server can then load adapters from this machine's folders or the hub")
    p.add_argument("--adapter-dir", metavar="DIR",
                   help="a request whose model is a folder of DIR (a saved adapter) loads it on first use")
    p.add_argument("--max-adapters", type=positive_int, metavar="N",
                   help="with --adapter-dir: at most N adapters from it loaded at once; the least recently used "
                        "idle one is unloaded to make room (default: no bound)")
    p.add_argument("--default-chat-template-kwargs", type=template_options, default={}, metavar="JSON",
                   help="every chat's chat template options, under those its adapter was trained with and the "
                        "request's chat_template_kwargs, e.g. '{\"enable_thinking\": false}' (vLLM's option)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="the HTTP server's log (info: one line per request)")


def _check_listen(host: str, port: int) -> None:
    """Binds ``host:port`` as uvicorn will (asyncio's create_server: every address the host resolves to,
    SO_REUSEADDR) and lets go, so that a port in use is a usage error before the model loads, not a
    bind error after it."""
    import socket

    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        usage_error("serve", f"--host {host}: {exc.strerror}")
    for family, kind, protocol, _, address in addresses:
        try:
            sock = socket.socket(family, kind, protocol)
        except OSError:  # a family this machine lacks: asyncio passes over it too
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                usage_error("serve", f"--host {host} --port {port}: cannot listen there: {exc.strerror}")


def serve_command(args) -> int:
    import uvicorn  # noqa: F401 -- serve() imports it to listen; missing, it is said before the model loads

    from ..library.adapter_set import AdapterSet
    from ..library.defaults import DEFAULT_MODEL, load_base
    from ..library.memory_plan import parse_size
    from ..serving.engine import Engine, attends_in_window
    from ..serving.server import BASE_MODEL, serve

    if args.max_adapters is not None and args.adapter_dir is None:
        usage_error("serve", "--max-adapters bounds the adapters loaded from --adapter-dir: give --adapter-dir")
    if args.adapter_dir is not None and not Path(args.adapter_dir).is_dir():
        usage_error("serve", f"--adapter-dir {args.adapter_dir}: no such directory")
    try:
        prefix_cache = parse_size(PREFIX_CACHE if args.prefix_cache is None else args.prefix_cache)
    except ValueError as exc:
        usage_error("serve", f"--prefix-cache: {exc}")
    try:
        max_body = parse_size(args.max_body_size)
    except ValueError as exc:
        usage_error("serve", f"--max-body-size: {exc}")
    if max_body < 1:
        usage_error("serve", f"--max-body-size must be at least 1 byte; got {args.max_body_size!r}")
    _check_listen(args.host, args.port)
    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=ADAPTER; got {item!r}")
        if name in adapters or name == BASE_MODEL:
            raise ValueError(f"--adapter: the name {name!r} is {'given twice' if name in adapters else 'reserved for the base'}")
        adapters[name] = path
    if adapters:
        adapter_set = AdapterSet.from_pretrained(adapters, args.base_model, torch_dtype=dtype_from(args))
    else:
        base, tokenizer = load_base(args.base_model or DEFAULT_MODEL, torch_dtype=dtype_from(args))
        adapter_set = AdapterSet(base, tokenizer=tokenizer)
        if args.base_model is None:  # what an adapter of another base (loaded later) is told it is not for
            adapter_set.base_described = f"the embedded default base, {DEFAULT_MODEL!r}"
    if args.prefix_cache is None and attends_in_window(adapter_set.base_model):  # the default, where it cannot be
        prefix_cache = 0
        print("qadapter serve: the prefix cache is off: this model attends within a sliding window, which a reused "
              "prefix would move", file=sys.stderr)
    serve(Engine(adapter_set, adapter_set.tokenizer, max_batch=args.max_batch,
                 max_prefill_tokens=args.max_prefill_tokens, prefix_cache_bytes=prefix_cache),
          args.host, args.port,
          log_level=args.log_level, allow_adapter_updates=args.allow_adapter_updates, adapter_dir=args.adapter_dir,
          max_adapters=args.max_adapters, max_body_bytes=max_body,
          default_template_options=args.default_chat_template_kwargs)
    return 0
