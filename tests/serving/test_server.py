"""``qadapter serve`` on the loopback address, spoken to with the real ``openai`` client: each answer
is its adapter's own greedy decoding whatever else shares the running batch, penalized as
transformers' ``generate`` penalizes; streaming and not; bad requests answered with a 4xx naming
what is wrong; a client that leaves mid-stream is dropped from
the batch; Ctrl-C ends the server cleanly."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from helpers import decode_joining_and_leaving, engine_decode, save_perturbed_adapters, save_tiny_base  # noqa: E402
from qadapter.library.adapter_set import AdapterSet  # noqa: E402
from qadapter.serving.engine import AdapterBusy, Engine, Request, RequestRefused  # noqa: E402
from qadapter.serving.server import Server  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = {"terse": dict(alpha_tilde=0.8, alpha_0=0.5), "formal": dict(lora_r=4, alpha_tilde=1.2),
            "kind": dict(alpha_tilde=0.5, alpha_0=0.2), "brief": dict(lora_r=2, alpha_0=1.5)}
PROMPTS = ["the capital of France", "hello world", "user assistant system hello", "Paris is",
           "the", "world hello the capital of", "system", "France is the capital"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tokenizer = save_tiny_base(root / "base")
    return root, tokenizer, save_perturbed_adapters(root, ADAPTERS, root / "base")


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties as a transformers logits processor, written from
    OpenAI's definition: ``score[t] -= frequency * count(t) + presence * (count(t) > 0)``, counting
    the tokens generated after the prompt's ``start`` tokens."""

    def __init__(self, start: int, frequency: float, presence: float) -> None:
        self.start, self.frequency, self.presence = start, frequency, presence

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for row, answer in enumerate(input_ids[:, self.start:].tolist()):
            for token in set(answer):
                scores[row, token] -= self.frequency * answer.count(token) + self.presence
        return scores


@pytest.fixture(scope="module")
def solo_text(saved):
    """Each (adapter, prompt)'s greedy completion decoded alone (one row), by a set of its own, through
    transformers' ``generate`` (its repetition penalty; OpenAI's penalties as :class:`OpenAIPenalties`)."""
    _, tokenizer, paths = saved
    reference = AdapterSet.from_pretrained(paths)
    eos = tokenizer.eos_token_id
    cache = {}

    def text(adapter, prompt, max_tokens, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
        key = (adapter, prompt, max_tokens, repetition_penalty, frequency_penalty, presence_penalty)
        if key not in cache:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
            openai_penalties = [OpenAIPenalties(ids.shape[1], frequency_penalty, presence_penalty)]
            out = reference.generate(ids, adapters=[adapter], max_new_tokens=max_tokens, eos_token_id=eos,
                                     pad_token_id=tokenizer.pad_token_id, do_sample=False,
                                     repetition_penalty=repetition_penalty,
                                     logits_processor=LogitsProcessorList(openai_penalties))[0, ids.shape[1]:].tolist()
            cache[key] = tokenizer.decode(out[:out.index(eos)] if eos in out else out, skip_special_tokens=True)
        return cache[key]
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running_server(engine: Engine, **options):
    """A server over ``engine`` in a background thread; yields (base_url, engine)."""
    port = free_port()
    app = Server(engine.start(), **options).app()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}/v1", engine
    instance.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def server(saved):
    """A server over the four adapters; (base_url, engine)."""
    _, tokenizer, paths = saved
    yield from running_server(Engine(AdapterSet.from_pretrained(paths), tokenizer, max_batch=16))


@pytest.fixture(scope="module")
def updatable_server(saved):
    """A server over two of the adapters that takes adapter updates; (base_url, engine)."""
    _, tokenizer, paths = saved
    engine = Engine(AdapterSet.from_pretrained({k: paths[k] for k in ("terse", "formal")}), tokenizer, max_batch=16)
    yield from running_server(engine, allow_adapter_updates=True)


def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


def test_models_lists_the_base_and_the_adapters(server, saved):
    models = client(server[0]).models.list().data
    assert [m.id for m in models] == ["base", *ADAPTERS]
    # vLLM's fields: where each model comes from, and an adapter's parent.
    assert models[0].root == str(saved[0] / "base") and models[0].parent is None
    assert [(m.root, m.parent) for m in models[1:]] == [(str(saved[2][name]), "base") for name in ADAPTERS]
    assert models[0].max_model_len == 128
    # created: when each was loaded (the base and the adapters given at start: the server's start).
    assert {m.created for m in models} == {models[0].created} and time.time() - 3600 < models[0].created <= time.time()
    one = client(server[0]).models.retrieve("formal")
    assert one.id == "formal" and one.parent == "base" and one.root == str(saved[2]["formal"])
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        client(server[0]).models.retrieve("nope")


def test_health_says_whether_the_engine_takes_requests(server, saved):
    """``/health``, a load balancer's probe: 200 while the engine runs, 503 when it does not."""
    from starlette.testclient import TestClient

    assert httpx.get(server[0].removesuffix("/v1") + "/health", timeout=10).status_code == 200
    _, tokenizer, paths = saved
    stopped = Engine(AdapterSet.from_pretrained({"terse": paths["terse"]}), tokenizer)  # never started
    answer = TestClient(Server(stopped).app()).get("/health")
    assert answer.status_code == 503 and "not running" in answer.json()["error"]["message"]


def test_metrics_count_what_the_server_did(saved):
    """``/metrics`` (Prometheus' text format, vLLM's names under ``qadapter:``): prompt and answer tokens
    as the usage reports them (a prompt once for its n choices; an echo that asks for no answer too),
    requests by finish reason (every reason's series there from the start), a time to first token and
    a latency per choice, every decode step, the adapter loaded while serving, HTTP responses by
    route and status class (a refused request too); nothing running or waiting once idle. Every
    engine metric is labelled with the base model's name, as vLLM's with its served model's."""
    from prometheus_client.parser import text_string_to_metric_families

    _, tokenizer, paths = saved
    engine = Engine(AdapterSet.from_pretrained({"terse": paths["terse"]}), tokenizer)
    for url, _ in running_server(engine, allow_adapter_updates=True):
        api = client(url)
        fresh = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10).text
        base = engine.adapter_set.base_model.config.name_or_path
        assert all(f'qadapter:request_success_total{{finished_reason="{reason}",model_name="{base}"}} 0.0' in fresh
                   for reason in ("stop", "length", "cancelled", "error"))
        answers = [api.completions.create(model="terse", prompt=PROMPTS[0], max_tokens=5, temperature=0),
                   api.completions.create(model="base", prompt=PROMPTS[1:3], max_tokens=3, temperature=0, n=3)]
        echoed = api.completions.create(model="terse", prompt=PROMPTS[4], max_tokens=0, echo=True)
        assert httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "kind", "lora_path": str(paths["kind"])},
                          timeout=60).status_code == 200
        answers.append(api.chat.completions.create(model="kind", messages=[{"role": "user", "content": PROMPTS[3]}],
                                                   max_tokens=4, temperature=0))
        assert httpx.post(f"{url}/completions", json={"model": "nope", "prompt": "x"}, timeout=10).status_code == 404
        assert httpx.get(f"{url}/no/such/path/{'x' * 40}", timeout=10).status_code == 404
        scraped = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=10)
    assert scraped.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(scraped.text))
    assert all(sample.labels["model_name"] == base for family in families if family.name.startswith("qadapter:")
               for sample in family.samples)
    samples = {(sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))): sample.value
               for family in families for sample in family.samples}
    reasons = [choice.finish_reason for answer in [*answers, echoed] for choice in answer.choices]
    usage = sum(a.usage.prompt_tokens for a in answers) + echoed.usage.prompt_tokens
    assert samples[("qadapter:prompt_tokens_total", ())] == usage
    assert samples[("qadapter:generation_tokens_total", ())] == sum(a.usage.completion_tokens for a in answers)
    for reason in set(reasons):
        assert samples[("qadapter:request_success_total", (("finished_reason", reason),))] == reasons.count(reason)
    assert samples[("qadapter:time_to_first_token_seconds_count", ())] == len(reasons) - 1 == 8  # the echo: no token
    assert samples[("qadapter:e2e_request_latency_seconds_count", ())] == 9
    assert samples[("qadapter:decode_step_seconds_count", ())] == engine.steps > 0
    assert samples[("qadapter:adapter_changes_total", (("change", "load"),))] == 1
    assert samples[("qadapter:num_requests_running", ())] == samples[("qadapter:num_requests_waiting", ())] == 0
    assert samples[("qadapter:num_adapters_loaded", ())] == 2
    http = {labels: value for (name, labels), value in samples.items() if name == "http_requests_total"}
    assert http[(("handler", "/v1/completions"), ("method", "POST"), ("status", "2xx"))] == 3
    assert http[(("handler", "/v1/completions"), ("method", "POST"), ("status", "4xx"))] == 1  # refused, counted
    assert http[(("handler", "/v1/chat/completions"), ("method", "POST"), ("status", "2xx"))] == 1
    assert http[(("handler", "none"), ("method", "GET"), ("status", "4xx"))] == 1  # no path in the labels


def test_logit_bias_moves_the_answer_as_openai_defines_it(server, saved):
    """A bias of +100 on a token makes every answer token that token (log-probs are <= 0), on both
    routes; -100 on the greedy answer's first token makes it the policy's second choice; a bias outside
    OpenAI's range or the vocabulary is a 400."""
    from qadapter.library.model import QAdapterModel

    _, tokenizer, paths = saved
    api = client(server[0])
    favoured = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" world"))[0]
    chat = api.chat.completions.create(model="kind", messages=[{"role": "user", "content": PROMPTS[1]}], max_tokens=4,
                                       temperature=0, logit_bias={str(favoured): 100})
    assert chat.choices[0].message.content == tokenizer.decode([favoured] * 4)
    ids = tokenizer(PROMPTS[1], add_special_tokens=False).input_ids
    forced = api.completions.create(model="kind", prompt=ids, max_tokens=4, temperature=0, logit_bias={str(favoured): 100})
    assert forced.choices[0].text == tokenizer.decode([favoured] * 4)
    with torch.no_grad():
        policy = QAdapterModel.from_pretrained(paths["kind"]).policy(input_ids=torch.tensor([ids])).logits[0, -1]
    first, second = policy.topk(2).indices.tolist()
    moved = api.completions.create(model="kind", prompt=ids, max_tokens=1, temperature=0, logprobs=0,
                                   logit_bias={str(first): -100})
    assert moved.choices[0].logprobs.token_logprobs[0] == pytest.approx(policy[second].item(), abs=1e-4)
    for bias, match in (({"abc": 1}, "logit_bias must map"), ({"\u00b2": 1}, "logit_bias must map"),
                        ({"5": 101}, r"\[-100, 100\]"),
                        ({str(len(tokenizer) + 10**6): 1}, "token ids in"), ({str(server[1].vocab): 1}, "token ids in")):
        with pytest.raises(openai.BadRequestError, match=match):
            api.completions.create(model="kind", prompt=PROMPTS[0], max_tokens=2, logit_bias=bias)
    last = api.completions.create(model="kind", prompt=ids, max_tokens=2, temperature=0,  # the vocabulary's last id
                                  logit_bias={str(server[1].vocab - 1): 100})
    assert last.choices[0].text == tokenizer.decode([server[1].vocab - 1] * 2)


def test_completion_is_the_adapters_own_greedy_decoding(server, solo_text):
    answer = client(server[0]).completions.create(model="formal", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert answer.choices[0].text == solo_text("formal", PROMPTS[0], 10)
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert answer.usage.completion_tokens <= 10 and answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    base = client(server[0]).completions.create(model="base", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert base.choices[0].text == solo_text(None, PROMPTS[0], 10)


def test_chat_streamed_equals_chat_whole(server):
    api = client(server[0])
    messages = [{"role": "user", "content": "hello world"}]
    whole = api.chat.completions.create(model="kind", messages=messages, max_tokens=12, temperature=0)
    chunks = list(api.chat.completions.create(model="kind", messages=messages, max_tokens=12, temperature=0,
                                              stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content and whole.choices[0].message.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # stream_options.include_usage: OpenAI's last chunk, the usage and no choices (the one usage sent).
    chunks = list(api.chat.completions.create(model="kind", messages=messages, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == streamed
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason and chunks[-2].usage is None


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_stream_carries_a_usage_only_with_include_usage(server, chat):
    """As OpenAI's: without ``stream_options.include_usage`` no chunk has a usage; with it every chunk has
    ``usage: null`` but the last, which has the usage and no choices."""
    url = f"{server[0]}/{'chat/' if chat else ''}completions"
    body = {"model": "kind", "max_tokens": 6, "temperature": 0,
            **({"messages": [{"role": "user", "content": "hello world"}]} if chat else {"prompt": "hello world"})}

    def stream(**fields) -> list[dict]:
        with httpx.stream("POST", url, json={**body, "stream": True, **fields}, timeout=60) as answer:
            lines = [line[6:] for line in answer.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    plain = stream()
    assert not any("usage" in chunk for chunk in plain) and plain[-1]["choices"][0]["finish_reason"]
    counted = stream(stream_options={"include_usage": True})
    assert all(chunk["usage"] is None for chunk in counted[:-1]) and counted[-1]["choices"] == []
    assert counted[-1]["usage"] == httpx.post(url, json=body, timeout=60).json()["usage"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stream", [False, None], ids=["stream-false", "no-stream"])
def test_stream_options_without_a_stream_are_refused(server, chat, stream):
    """As OpenAI and vLLM answer: options of a stream that the request does not ask for are a 400."""
    body = {"model": "kind", "max_tokens": 2, "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}),
            **({} if stream is None else {"stream": stream})}
    answer = httpx.post(f"{server[0]}/{'chat/' if chat else ''}completions", json=body, timeout=60)
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == "stream_options" and "stream=true" in error["message"]


def test_stop_strings_end_the_answer_before_them(server, solo_text):
    full = solo_text("terse", PROMPTS[1], 16)
    if len(full) < 4:
        pytest.skip("the tiny model's answer is too short to cut")
    stop = full[2:4]
    answer = client(server[0]).completions.create(model="terse", prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                                  stop=[stop])
    assert answer.choices[0].text == full[:full.index(stop)] and answer.choices[0].finish_reason == "stop"


def test_32_concurrent_requests_over_4_adapters_each_get_their_own_answer(server, solo_text):
    """Requests join and leave the running batch at different steps (prompt lengths and answer
    lengths differ); none is lost, none gets another's tokens."""
    api = client(server[0])
    jobs = [(name, PROMPTS[i % len(PROMPTS)], 4 + i % 7) for i, name in enumerate(list(ADAPTERS) * 8)]

    def ask(job):
        name, prompt, max_tokens = job
        if len(job[1]) % 2:
            chunks = api.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return api.completions.create(model=name, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text

    steps = server[1].steps
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [solo_text(*job) for job in jobs]
    assert server[1].steps - steps < sum(job[2] for job in jobs) / 2  # decoded together, not one at a time


def test_bad_requests_get_a_4xx_naming_the_problem(server):
    api = client(server[0])
    with pytest.raises(openai.NotFoundError, match="'nope' does not exist"):
        api.completions.create(model="nope", prompt="hello", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer >= 1"):
        api.completions.create(model="terse", prompt="hello", max_tokens=-3)
    context = server[1].context_length
    with pytest.raises(openai.BadRequestError, match="context length") as info:
        api.completions.create(model="terse", prompt=[7] * (context - 3), max_tokens=8)
    assert info.value.param == "max_tokens"  # the limit the client asked for; without one, the prompt is blamed
    with pytest.raises(openai.BadRequestError, match="context length") as info:
        api.completions.create(model="terse", prompt="hello world " * context, max_tokens=8)
    assert info.value.param == "prompt"  # too long for any limit
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.completions.create(model="terse", prompt="hello", max_tokens=2, temperature=5)
    with pytest.raises(openai.BadRequestError, match="messages"):
        api.chat.completions.create(model="terse", messages=[], max_tokens=2)
    # What would change the answer and is not implemented is refused, not ignored; its default is accepted.
    for name, value in (("best_of", 3), ("suffix", "the end")):
        with pytest.raises(openai.BadRequestError, match=f"{name} is not supported by this server"):
            api.completions.create(model="terse", prompt="hello", max_tokens=2, **{name: value})
    with pytest.raises(openai.BadRequestError, match="tools is not supported"):
        api.chat.completions.create(model="terse", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs cannot set tokenize") as info:
        api.chat.completions.create(model="terse", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                    extra_body={"chat_template_kwargs": {"tokenize": False}})
    assert info.value.param == "chat_template_kwargs"
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].role must be one of system, user, assistant"):
        api.chat.completions.create(model="terse", max_tokens=2, messages=[{"role": "user", "content": "hi"},
                                                                           {"role": "bogus", "content": "x"}])
    assert api.completions.create(model="terse", prompt="hello", max_tokens=2, temperature=0, n=1, echo=False,
                                  logprobs=0, frequency_penalty=0.0).choices[0].text is not None
    raw = httpx.post(f"{server[0]}/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    for body, message in ((b'{"model": "terse", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
                          (b'{"model": "terse", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "integer"),
                          (b'{"model": "terse", "prompt": ["ok", "\\udfff"]}', "lone UTF-16 surrogate"),
                          (b'{"model": "\\ud800", "prompt": "hi"}', "lone UTF-16 surrogate"),
                          (b'{"model": "terse", "prompt": "\xed\xa0\x80"}', "not valid JSON in UTF-8"),  # encoded
                          ('{"model": "terse", "prompt": "hi"}'.encode("utf-16"), "not valid JSON in UTF-8")):
        raw = httpx.post(f"{server[0]}/completions", content=body, headers={"content-type": "application/json"})
        assert raw.status_code == 400 and message in raw.json()["error"]["message"], raw.text
    paired = api.completions.create(model="terse", prompt="\U0001F600", max_tokens=2, temperature=0)  # an escaped pair
    assert paired.usage.prompt_tokens >= 1
    with pytest.raises(openai.BadRequestError, match="n times the prompts asks for 4096 answers; a request gets at most"):
        api.completions.create(model="terse", prompt=["hello"] * 64, n=64, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="characters are more than the model's context length"):
        api.completions.create(model="terse", prompt="x" * 10**6, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="characters are more than the model's context length"):
        api.chat.completions.create(model="terse", messages=[{"role": "user", "content": "x" * 10**6}], max_tokens=1)
    # The server is still serving.
    assert api.completions.create(model="terse", prompt="hello", max_tokens=2, temperature=0).choices[0].text is not None


def test_chats_render_with_the_adapters_template_options_the_requests_over_them(tmp_path):
    """An adapter trained with ``enable_thinking=False`` is prompted so (one in the adapter directory
    before it loads too); a request's ``chat_template_kwargs`` (vLLM's field) goes over them."""
    import shutil

    from helpers import tiny_thinking_tokenizer
    from qadapter.serving.server import BadRequest

    save_tiny_base(tmp_path / "base")
    quiet = {"enable_thinking": False}
    paths = save_perturbed_adapters(tmp_path, {"quiet": {"chat_template_kwargs": quiet}, "plain": {}}, tmp_path / "base")
    shutil.copytree(paths["quiet"], tmp_path / "directory" / "later")
    thinking = tiny_thinking_tokenizer()
    server = Server(Engine(AdapterSet.from_pretrained(paths), thinking), adapter_dir=tmp_path / "directory")

    def prompt(model, **fields):
        return thinking.decode(server._chat_prompt({"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                    **fields}))

    for model in ("quiet", "later"):
        assert prompt(model).endswith("</think>\n\n"), model
    assert server.engine.adapter_set.template_options("quiet") == quiet
    with pytest.raises(KeyError, match="no adapter named 'later' is loaded"):
        server.engine.adapter_set.template_options("later")
    for model in ("plain", "base"):
        assert prompt(model).endswith("<|im_start|>assistant\n"), model
    assert prompt("quiet", chat_template_kwargs={"enable_thinking": True}).endswith("<|im_start|>assistant\n")
    assert prompt("plain", chat_template_kwargs=quiet).endswith("</think>\n\n")
    # The server's defaults (vLLM's --default-chat-template-kwargs) go under the adapter's and the request's.
    loud = {"enable_thinking": True}
    for default, model, fields, quieted in ((quiet, "base", {}, True), (quiet, "plain", {}, True),
                                            (loud, "quiet", {}, True), (loud, "plain", {}, False),
                                            (quiet, "plain", {"chat_template_kwargs": loud}, False)):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
        rendered = thinking.decode(Server(server.engine, default_template_options=default)._chat_prompt(body))
        assert rendered.endswith("</think>\n\n") == quieted, (default, model, fields)
    with pytest.raises(ValueError, match="default_template_options cannot set tokenize"):
        Server(server.engine, default_template_options={"tokenize": True})
    with pytest.raises(BadRequest, match="chat_template_kwargs must be an object of named options") as info:
        prompt("plain", chat_template_kwargs=["enable_thinking"])
    assert info.value.param == "chat_template_kwargs"
    # A template that refuses an option's value: the request's options are named, not its messages.
    thinking.chat_template = ("{% if enable_thinking is defined and enable_thinking is not boolean %}"
                              "{{ raise_exception('enable_thinking is true or false') }}{% endif %}" + thinking.chat_template)
    with pytest.raises(BadRequest, match="refuses the chat_template_kwargs: enable_thinking is true or false") as info:
        prompt("plain", chat_template_kwargs={"enable_thinking": "no"})
    assert info.value.param == "chat_template_kwargs"


def test_a_body_over_the_bound_is_refused_before_it_is_read_whole(server):
    """413, whether its length is declared or it comes in chunks; the CLI's --max-body-size sets it."""
    from starlette.testclient import TestClient

    http = TestClient(Server(server[1], max_body_bytes=64).app())  # no lifespan: the shared engine keeps running
    body = json.dumps({"model": "terse", "prompt": "x" * 100}).encode()
    for content in (body, iter([body[:50], body[50:]])):
        answer = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert answer.status_code == 413, answer.text
        assert "larger than this server takes (64 bytes" in answer.json()["error"]["message"]
    assert http.post("/v1/completions", json={"model": "terse"}).status_code == 400  # under it: read
    with pytest.raises(ValueError, match="max_body_bytes must be an integer >= 1"):
        Server(server[1], max_body_bytes=0)


@pytest.mark.parametrize("option, value, message", [
    ("allow_adapter_updates", "no", "allow_adapter_updates must be True or False; got 'no'"),  # would open the routes
    ("allow_adapter_updates", 1, "allow_adapter_updates must be True or False"),
    ("default_max_tokens", "256", "default_max_tokens must be an integer >= 1; got '256'"),
    ("default_max_tokens", None, "default_max_tokens must be an integer >= 1; got None"),
    ("default_max_tokens", True, "default_max_tokens must be an integer >= 1; got True"),
    ("default_max_tokens", 0, "default_max_tokens must be an integer >= 1; got 0")])
def test_server_options_of_another_type_are_refused_by_name(server, option, value, message):
    """Not taken as what they are not: a chat request without max_tokens refused as if its client had
    sent the server's default, the string "no" read as true."""
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        Server(server[1], **{option: value})


def test_an_unknown_route_or_method_is_answered_in_the_error_shape(server):
    """Not Starlette's plain text: OpenAI's error object, naming the path (404) or the method (405)."""
    root = server[0].removesuffix("/v1")
    missing = httpx.post(f"{root}/v1/embeddings", json={}, timeout=10)
    error = missing.json()["error"]
    assert missing.status_code == 404 and error["type"] == "not_found_error"
    assert "no route /v1/embeddings" in error["message"] and "/v1/chat/completions" in error["message"]
    wrong = httpx.get(f"{server[0]}/completions", timeout=10)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["message"] == "GET is not allowed on /v1/completions; it takes POST"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_field_the_server_does_not_take_is_refused_by_name(server, chat):
    """Each field is implemented, cannot change the answer, or is refused with a 400 naming it, never
    silently ignored: a vLLM parameter this server does not take, a made-up field, the other route's own field."""
    api = client(server[0])

    def ask(**fields):
        if chat:
            answer = api.chat.completions.create(model="formal", messages=[{"role": "user", "content": "hello world"}],
                                                 max_tokens=6, temperature=0, **fields)
            return answer.choices[0].message.content
        return api.completions.create(model="formal", prompt="hello world", max_tokens=6, temperature=0,
                                      **fields).choices[0].text

    others = ("suffix", "") if chat else ("messages", [{"role": "user", "content": "hi"}])
    for name, value in (("ignore_eos", True), ("made_up_knob", True), others):
        with pytest.raises(openai.BadRequestError, match=f"unsupported field '{name}': this server takes model, "
                                                         f"{'messages' if chat else 'prompt'}, max_tokens") as exc:
            ask(extra_body={name: value})
        assert exc.value.param == name
    with pytest.raises(openai.BadRequestError, match="stream_options must be an object") as exc:
        ask(extra_body={"stream_options": {"continuous_usage_stats": True}})
    assert exc.value.param == "stream_options"
    # OpenAI's bookkeeping fields are taken and change nothing.
    bookkeeping = dict(metadata={"run": "7"}, store=True, service_tier="auto") if chat else {}
    assert ask(user="someone", **bookkeeping) == ask()
    if chat:  # inside a message too: a participant's name would change the prompt, so it is refused
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\] has name: a message here is its role") as exc:
            api.chat.completions.create(model="formal", messages=[{"role": "user", "content": "hi", "name": "ann"}],
                                        max_tokens=2)
        assert exc.value.param == "messages"


def test_chat_content_may_be_a_list_of_text_parts(server):
    """OpenAI's content parts, what many clients send: text parts, in any role, read as their texts
    joined by newlines (as vLLM reads them); any other part (an image, audio) is a 400 naming it, never dropped."""
    api = client(server[0])

    def ask(system, user):
        return api.chat.completions.create(model="formal", max_tokens=6, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": user}]).choices[0].message.content

    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    assert ask([{"type": "text", "text": "be brief"}], parts) == ask("be brief", "hello\nworld")
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    for content, message in (([parts[0], image], r"messages\[1\].content\[1\] is a part of type 'image_url': "
                                                 "text parts only"),
                             ([{"type": "input_audio", "input_audio": {}}], r"content\[0\] is a part of type 'input_audio'"),
                             ([{"text": "no type"}], r"messages\[1\].content\[0\] must be a text part"),
                             ([{"type": "text", "text": "hi", "cache_control": {}}], "must be a text part"),
                             ([], r"messages\[1\].content must be a string or a non-empty list")):
        with pytest.raises(openai.BadRequestError, match=message) as exc:
            ask("be brief", content)
        assert exc.value.param == "messages"


def test_penalties_decode_as_transformers_generate_with_them(server, solo_text):
    """Greedy answers under transformers' repetition penalty and OpenAI's frequency and presence
    penalties, on both routes' wiring, are the reference's; a penalty does change an answer here."""
    api = client(server[0])
    changed = False
    for options in (dict(repetition_penalty=1.3), dict(frequency_penalty=0.8, presence_penalty=1.5),
                    dict(repetition_penalty=0.9, frequency_penalty=-0.5, presence_penalty=2.0)):
        rp = options.get("repetition_penalty", 1.0)
        for prompt in PROMPTS[3:5]:
            answer = api.completions.create(model="formal", prompt=prompt, max_tokens=12, temperature=0,
                                            frequency_penalty=options.get("frequency_penalty"),
                                            presence_penalty=options.get("presence_penalty"),
                                            extra_body={"repetition_penalty": rp})
            assert answer.choices[0].text == solo_text("formal", prompt, 12, **options), (options, prompt)
            changed |= answer.choices[0].text != solo_text("formal", prompt, 12)
    assert changed
    messages = [{"role": "user", "content": "hello world"}]
    plain = api.chat.completions.create(model="kind", messages=messages, max_tokens=12, temperature=0)
    penalized = api.chat.completions.create(model="kind", messages=messages, max_tokens=12, temperature=0,
                                            presence_penalty=2, frequency_penalty=2,
                                            extra_body={"repetition_penalty": 1.5})
    assert penalized.choices[0].message.content != plain.choices[0].message.content


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_warpers_keeping_only_the_top_token_sample_as_greedy(server, chat):
    """top_k 1 (or min_p 1) at temperature 1 draws the greedy answer; top_k 0 and -1 (vLLM's) are off."""
    api = client(server[0])

    def ask(**fields):
        if chat:
            answer = api.chat.completions.create(model="brief", messages=[{"role": "user", "content": "hello"}],
                                                 max_tokens=10, **fields)
            return answer.choices[0].message.content
        return api.completions.create(model="brief", prompt=PROMPTS[2], max_tokens=10, **fields).choices[0].text

    greedy = ask(temperature=0)
    for extra in ({"top_k": 1}, {"min_p": 1.0}, {"top_k": 1, "min_p": 0.5, "repetition_penalty": 1.0}):
        assert ask(temperature=1, extra_body=extra) == greedy, extra
    for off in (0, -1):
        assert ask(temperature=0, extra_body={"top_k": off}) == greedy


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_a_sampling_option_out_of_its_range_is_a_400_naming_it(server, chat):
    api = client(server[0])
    bad = (("top_k", -5), ("top_k", 2.5), ("top_k", True), ("min_p", 2), ("min_p", -0.1), ("repetition_penalty", 0),
           ("repetition_penalty", -1.5), ("repetition_penalty", "high"), ("presence_penalty", 3),
           ("presence_penalty", -2.5), ("frequency_penalty", 2.01), ("frequency_penalty", True), ("n", 0),
           ("n", 129), ("n", "2"), ("seed", -1), ("seed", 2**63), ("logprobs", "yes"), ("stop", "x" * 257),
           ("stop", ["a"] * 5), ("stop", [""]),
           *((("top_logprobs", 21), ("top_logprobs", -1)) if chat else (("logprobs", 21), ("logprobs", -1),
                                                                         ("echo", 1))))
    for name, value in bad:
        with pytest.raises(openai.BadRequestError, match=f"{name} must be") as exc:
            if chat:
                api.chat.completions.create(model="terse", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                            extra_body={name: value})
            else:
                api.completions.create(model="terse", prompt="hello", max_tokens=2, extra_body={name: value})
        assert exc.value.param == name, (name, value)
    # Python's JSON reads Infinity, NaN, and numbers beyond any float: none is a number here.
    route, head = ("chat/completions", '"messages": [{"role": "user", "content": "hi"}]') if chat else \
        ("completions", '"prompt": "hello"')
    for name, value in (("repetition_penalty", "Infinity"), ("repetition_penalty", "1e999"),
                        ("repetition_penalty", "1" + "0" * 400), ("min_p", "NaN"), ("presence_penalty", "-Infinity")):
        raw = httpx.post(f"{server[0]}/{route}", content=f'{{"model": "terse", {head}, "{name}": {value}}}',
                         headers={"content-type": "application/json"})
        assert raw.status_code == 400 and raw.json()["error"]["param"] == name, (name, value, raw.text)


def test_the_text_held_back_for_stop_strings_is_found_in_the_unsent_tail():
    """A step looks for a stop string's start only in the text not yet sent (any earlier start was held
    back): the same hold as a search of the whole text, at a cost bounded by the unsent tail."""
    import random

    from qadapter.serving.engine import _held_back

    def whole(text, stops):  # every prefix of every stop against the whole text
        hold = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        return len(text) - hold - (text[:len(text) - hold].endswith("\ufffd"))

    rng = random.Random(0)
    for _ in range(300):
        stops = tuple("".join(rng.choice("ab\ufffd") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 3)))
        text, sent = "", 0
        for _ in range(12):
            text += "".join(rng.choice("abc") for _ in range(rng.randint(1, 3)))
            final = _held_back(text, stops, sent)
            assert final == whole(text, stops), (text, stops, sent)
            sent = max(sent, final)


def test_n_choices_decode_as_n_requests(server, solo_text):
    """``n``: greedy choices are each the adapter's own answer; seeded sampled choices are the answers of
    the seeds ``seed``, ``seed + 1``, ... (choice 0 is the same request with n = 1); the usage counts the
    prompt once and every choice's tokens."""
    api = client(server[0])
    answer = api.completions.create(model="formal", prompt=PROMPTS[0], max_tokens=10, temperature=0, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert [c.text for c in answer.choices] == [solo_text("formal", PROMPTS[0], 10)] * 3
    one = api.completions.create(model="formal", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert answer.usage.prompt_tokens == one.usage.prompt_tokens
    assert answer.usage.completion_tokens == 3 * one.usage.completion_tokens

    messages = [{"role": "user", "content": "hello world"}]

    def sampled(n, seed, **options):
        return api.chat.completions.create(model="kind", messages=messages, max_tokens=12, temperature=1.0, n=n,
                                           seed=seed, **options)

    four = sampled(4, 7)
    texts = [c.message.content for c in four.choices]
    assert len(set(texts)) > 1  # different seeds: different samples
    assert [sampled(1, 7 + i).choices[0].message.content for i in (0, 2)] == [texts[0], texts[2]]
    chunks = list(sampled(4, 7, stream=True, stream_options={"include_usage": True}))
    streamed = [""] * 4
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        streamed[choice.index] += choice.delta.content or ""
    assert streamed == texts
    assert sorted(c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason) == [0, 1, 2, 3]
    assert chunks[-1].choices == [] and chunks[-1].usage == four.usage


def test_several_prompts_in_one_completions_request(server, solo_text, saved):
    """OpenAI's list of prompts (strings or token ids): choice ``j * n + i`` is prompt ``j``'s ``i``-th
    answer, each its adapter's own; the usage counts each prompt once."""
    tokenizer = saved[1]
    api = client(server[0])
    prompts = [PROMPTS[0], tokenizer(PROMPTS[1], add_special_tokens=False).input_ids, PROMPTS[2]]
    answer = api.completions.create(model="terse", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in answer.choices] == list(range(6))
    assert [c.text for c in answer.choices] == [solo_text("terse", PROMPTS[j], 6) for j in range(3) for _ in range(2)]
    assert answer.usage.prompt_tokens == sum(len(tokenizer(PROMPTS[j], add_special_tokens=False).input_ids)
                                             for j in range(3))
    streamed = [""] * 6
    for chunk in api.completions.create(model="terse", prompt=prompts, max_tokens=6, temperature=0, n=2, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == [c.text for c in answer.choices]
    for bad in ([], ["fine", 3], [[1, 2], []]):
        with pytest.raises(openai.BadRequestError, match="prompt must be a non-empty string") as exc:
            api.completions.create(model="terse", prompt=bad, max_tokens=2)
        assert exc.value.param == "prompt"


def test_logprobs_are_the_policys_own(server, saved):
    """The answer tokens' log-probs (and the likeliest alternatives) are the customized policy's, as
    transformers' ``generate`` scores it; streamed, the chunks' entries add up to the whole answer's."""
    _, tokenizer, paths = saved
    api = client(server[0])
    answer = api.completions.create(model="formal", prompt=PROMPTS[3], max_tokens=8, temperature=0, logprobs=3)
    got = answer.choices[0].logprobs
    ids = torch.tensor([tokenizer(PROMPTS[3], add_special_tokens=False).input_ids])
    out = AdapterSet.from_pretrained(paths).generate(
        ids, adapters=["formal"], max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    tokens = out.sequences[0, ids.shape[1]:].tolist()[:len(got.tokens)]
    want = [float(scores[0, t]) for scores, t in zip(out.scores, tokens)]
    assert got.tokens == [tokenizer.decode([t]) for t in tokens] and "".join(got.tokens) == answer.choices[0].text
    torch.testing.assert_close(torch.tensor(got.token_logprobs), torch.tensor(want), rtol=0, atol=1e-4)
    for top, scores, taken in zip(got.top_logprobs, out.scores, got.token_logprobs):
        assert next(iter(top.values())) == max(top.values()) == taken  # greedy: the answer's token is the likeliest
        # Keyed by text, two tokens of one text (an incomplete character) are one key, as in OpenAI's format.
        likeliest = scores[0].topk(3)
        assert set(top) == {tokenizer.decode([t]) for t in likeliest.indices.tolist()}
        assert all(min(abs(v - w) for w in likeliest.values.tolist()) < 1e-4 for v in top.values())
    assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]

    messages = [{"role": "user", "content": "hello world"}]
    whole = api.chat.completions.create(model="kind", messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                        top_logprobs=2)
    content = whole.choices[0].logprobs.content
    assert "".join(e.token for e in content) == whole.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 for e in content)
    assert bytes(sum((e.bytes for e in content), [])).decode("utf-8", "replace") == whole.choices[0].message.content
    assert all(e.logprob == e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)
    chunks = api.chat.completions.create(model="kind", messages=messages, max_tokens=10, temperature=0, logprobs=True,
                                         top_logprobs=2, stream=True)
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == content
    plain = api.chat.completions.create(model="kind", messages=messages, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs: true"):
        api.chat.completions.create(model="kind", messages=messages, max_tokens=2, top_logprobs=2)


def test_a_chat_answer_of_a_split_character_gives_each_tokens_own_bytes(server, saved):
    """The chat route's log-prob bytes are each token's share of a character's UTF-8 (é is C3 A9), not the
    bytes of its decoded text alone (U+FFFD, EF BF BD): an answer forced to é's first byte token says C3."""
    _, tokenizer, _ = saved
    first = tokenizer("é", add_special_tokens=False).input_ids[0]
    assert tokenizer.decode([first]) == "\ufffd"  # a byte-level token of part of the character
    answer = client(server[0]).chat.completions.create(
        model="kind", messages=[{"role": "user", "content": PROMPTS[0]}], max_tokens=2, temperature=0,
        logprobs=True, logit_bias={str(first): 100})
    content = answer.choices[0].logprobs.content
    assert [e.bytes for e in content] == [[0xC3], [0xC3]] and answer.choices[0].message.content == "\ufffd" * 2


@pytest.mark.parametrize("kind", ["byte-level", "byte-fallback"])
def test_log_prob_bytes_are_each_tokens_share_of_the_utf8(kind):
    """A character split over tokens decodes to U+FFFD from each token alone; OpenAI's bytes are each
    token's share of the character's UTF-8, so that a client joining them gets the text."""
    from helpers import tiny_chat_tokenizer, tiny_sentencepiece_tokenizer
    from qadapter.serving.server import token_bytes

    tokenizer = tiny_chat_tokenizer() if kind == "byte-level" else tiny_sentencepiece_tokenizer()
    text = "héllo 🤗 wörld 中文"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    split = [i for i in ids if tokenizer.decode([i]) == "\ufffd"]
    assert len(split) >= 7  # é, ö, 🤗 and 中文 in byte tokens of neither vocabulary
    of = token_bytes(tokenizer)
    assert all(len(of(i)) == 1 and of(i) != "\ufffd".encode() for i in split)
    assert b"".join(of(i) for i in split) == "é🤗ö中文".encode()
    joined = b"".join(of(i) for i in ids).decode()
    # A SentencePiece text's first piece is a word's start (▁): inside an answer, a space.
    assert joined == (text if kind == "byte-level" else " " + text)


def test_echo_scores_the_prompt_under_the_policy(server, saved):
    """``echo`` with ``logprobs``, as lm-eval's ``local-completions`` asks to score a continuation: the
    prompt's tokens' log-probs are the customized policy's (a single-adapter model's forward over the
    prompt), the first token's none; streamed, the same text and entries."""
    from qadapter.library.model import QAdapterModel
    from qadapter.serving.server import token_text

    _, tokenizer, paths = saved
    api = client(server[0])
    ids = tokenizer(PROMPTS[5], add_special_tokens=False).input_ids
    answer = api.completions.create(model="formal", prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True)
    got = answer.choices[0]
    assert got.text.startswith(tokenizer.decode(ids)) and len(got.logprobs.tokens) == len(ids) + 1
    assert got.logprobs.token_logprobs[0] is None and got.logprobs.top_logprobs[0] is None
    text_of = token_text(tokenizer)
    assert got.logprobs.tokens[:len(ids)] == [text_of(t) for t in ids]  # each entry is its own prompt token's
    with torch.no_grad():
        policy = QAdapterModel.from_pretrained(paths["formal"]).policy(input_ids=torch.tensor([ids])).logits[0]
    want = policy[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(got.logprobs.token_logprobs[1:len(ids)]), want, rtol=0, atol=1e-4)
    chunks = list(api.completions.create(model="formal", prompt=ids, max_tokens=1, temperature=0, logprobs=1,
                                         echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == got.text
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        got.logprobs.token_logprobs
    plain = api.completions.create(model="formal", prompt=PROMPTS[5], max_tokens=4, temperature=0, echo=True)
    alone = api.completions.create(model="formal", prompt=PROMPTS[5], max_tokens=4, temperature=0)
    assert plain.choices[0].text == PROMPTS[5] + alone.choices[0].text and plain.choices[0].logprobs is None
    streamed = api.completions.create(model="formal", prompt=PROMPTS[5], max_tokens=4, temperature=0, echo=True,
                                      stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_echoed_prompts_score_together_and_alone(server, saved):
    """Several echoed prompts in one request (one prefill for all, lm-eval's batches) score as each
    alone does; ``max_tokens`` 0 scores the prompt without an answer; 0 without ``echo`` is refused."""
    _, tokenizer, _ = saved
    api = client(server[0])
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS[:4]]
    together = api.completions.create(model="kind", prompt=ids, max_tokens=2, temperature=0, logprobs=2, echo=True)
    for i, one in enumerate(ids):
        alone = api.completions.create(model="kind", prompt=one, max_tokens=2, temperature=0, logprobs=2,
                                       echo=True).choices[0]
        got = together.choices[i]
        assert got.text == alone.text and got.logprobs.tokens == alone.logprobs.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs.token_logprobs[1:]),
                                   torch.tensor(alone.logprobs.token_logprobs[1:]), rtol=0, atol=1e-5)
        assert [list(t) for t in got.logprobs.top_logprobs[1:]] == [list(t) for t in alone.logprobs.top_logprobs[1:]]
        scored = api.completions.create(model="kind", prompt=one, max_tokens=0, logprobs=2, echo=True).choices[0]
        assert scored.text == tokenizer.decode(one) and scored.finish_reason == "length"
        assert len(scored.logprobs.tokens) == len(one)
        assert scored.logprobs.token_logprobs[0] is None and scored.logprobs.tokens == got.logprobs.tokens[:len(one)]
        torch.testing.assert_close(torch.tensor(scored.logprobs.token_logprobs[1:]),
                                   torch.tensor(got.logprobs.token_logprobs[1:len(one)]), rtol=0, atol=1e-5)
    texts = api.completions.create(model="base", prompt=PROMPTS[:2], max_tokens=0, echo=True)
    assert [c.text for c in texts.choices] == PROMPTS[:2] and texts.usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="max_tokens must be an integer >= 1; got 0"):
        api.completions.create(model="kind", prompt=PROMPTS[0], max_tokens=0)


def test_lm_evals_own_client_scores_the_served_policy(server, saved):
    """lm-eval's ``local-completions`` model (its OpenAI client: a list of token-id prompts, ``echo``
    and ``logprobs``) against the server gives the log-likelihoods and greediness that the native
    lm-eval model computes on the same adapter, and the same greedy generations."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm_eval[api]
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from qadapter.evaluation.lm_eval_model import QAdapterLM

    root, _, paths = saved
    served = LocalCompletionsAPI(model="formal", base_url=f"{server[0]}/completions", tokenizer=str(root / "base"),
                                 num_concurrent=1, max_retries=1, batch_size=2)
    native = QAdapterLM(str(paths["formal"]), batch_size=2)
    pairs = [(PROMPTS[i], " " + PROMPTS[i + 1]) for i in range(4)]
    requests = [Instance("loglikelihood", {}, pair, k) for k, pair in enumerate(pairs)]
    got, want = served.loglikelihood(requests, disable_tqdm=True), native.loglikelihood(requests, disable_tqdm=True)
    torch.testing.assert_close(torch.tensor([g[0] for g in got]), torch.tensor([w[0] for w in want]), rtol=0,
                               atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    generate = [Instance("generate_until", {}, (p, {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}), k)
                for k, p in enumerate(PROMPTS[:3])]
    assert served.generate_until(generate, disable_tqdm=True) == native.generate_until(generate, disable_tqdm=True)


def test_a_failing_step_answers_its_requests_with_an_error_and_the_server_goes_on(server, monkeypatch):
    base_url, engine = server
    real = engine.adapter_set.next_scores

    def failing(*args, **kwargs):
        monkeypatch.setattr(engine.adapter_set, "next_scores", real)  # once
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine.adapter_set, "next_scores", failing)
    with pytest.raises(openai.InternalServerError, match="simulated"):
        client(base_url).completions.create(model="kind", prompt="hello", max_tokens=3, temperature=0)
    assert engine.wait_idle(10)
    assert client(base_url).completions.create(model="kind", prompt="hello", max_tokens=3, temperature=0).usage


def test_a_client_leaving_mid_stream_is_dropped_from_the_batch(server):
    base_url, engine = server
    body = {"model": "brief", "prompt": "hello world", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # one piece of text, then hang up
    assert engine.wait_idle(30), "the request of a client that went away is still decoding"
    answer = client(base_url).completions.create(model="brief", prompt="hello", max_tokens=3, temperature=0)
    assert answer.usage.completion_tokens >= 1


def test_a_client_leaving_before_its_answer_is_dropped_from_the_batch(server, monkeypatch):
    """Not streamed too: a client that gives up waiting (a timeout) takes its request out of the batch."""
    base_url, engine = server
    real = engine.adapter_set.next_scores

    def slow(*args, **kwargs):  # 100 tokens: 5 s
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.adapter_set, "next_scores", slow)
    cancelled = engine.metrics.finished["cancelled"]._value.get()
    for chat in (False, True):
        body = {"model": "brief", "max_tokens": 100, "temperature": 0,
                **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hello world"})}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/{'chat/' if chat else ''}completions", json=body, timeout=0.5)
        assert engine.wait_idle(2), "the request of a client that went away is still decoding"
    assert engine.metrics.finished["cancelled"]._value.get() == cancelled + 2


def test_ctrl_c_ends_the_server_cleanly(saved):
    root, _, paths = saved
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "qadapter", "serve", "--adapter", f"terse={paths['terse']}",
                                "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not come up")
        lines = []
        body = {"model": "terse", "prompt": "hello world", "max_tokens": 16, "temperature": 0, "stream": True}

        def listen():
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60) as response:
                lines.extend(line for line in response.iter_lines() if line)

        listener = threading.Thread(target=listen)
        listener.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        listener.join(60)
    finally:
        process.kill()
    assert process.returncode == 130, output  # the conventional status of a process ended by SIGINT
    assert "Traceback" not in output and "ERROR" not in output, output
    assert lines and lines[-1] == "data: [DONE]"  # the running request finished, or was cancelled, cleanly
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop", "cancelled")


@pytest.mark.parametrize("argument, message", [("noequals", "NAME=ADAPTER"), ("base=somewhere", "reserved for the base"),
                                               ("=somewhere", "NAME=ADAPTER")])
def test_serve_command_refuses_bad_adapter_arguments(argument, message, capsys):
    from qadapter.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["serve", "--adapter", argument])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_serve_command_refuses_a_port_in_use_before_loading_anything(monkeypatch, capsys):
    """A usage error (2) naming --host and --port, at once, not uvicorn's bind error once the model has loaded."""
    from qadapter.cli import main
    from qadapter.library import defaults

    def load_base(*args, **kwargs):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(defaults, "load_base", load_base)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            main(["serve", "--host", "127.0.0.1", "--port", str(port)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--host 127.0.0.1 --port {port}: cannot listen there" in err
    assert len(err.strip().splitlines()) == 1


def test_serve_command_refuses_a_name_given_twice(saved, capsys):
    from qadapter.cli import main

    path = saved[2]["terse"]
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--adapter", f"a={path}", "--adapter", f"a={path}"])
    assert exc.value.code == 2 and "given twice" in capsys.readouterr().err


def test_serve_command_passes_its_options_to_the_engine_and_the_server(saved, monkeypatch):
    """``qadapter serve``'s batch, prefill, body size, adapter directory and chat template options reach
    the engine and the server as given (the server itself is not started)."""
    from qadapter.cli import main
    from qadapter.serving import server

    served = []
    monkeypatch.setattr(server, "serve", lambda engine, *args, **kwargs: served.append((engine, args, kwargs)))
    port = free_port()
    directory = str(Path(saved[2]["terse"]).parent)
    assert main(["serve", "--adapter", f"a={saved[2]['terse']}", "--port", str(port), "--max-batch", "3",
                 "--max-prefill-tokens", "64", "--max-body-size", "2KiB", "--adapter-dir", directory,
                 "--max-adapters", "2", "--allow-adapter-updates", "--log-level", "warning",
                 "--default-chat-template-kwargs", '{"enable_thinking": false}']) == 0
    (engine, args, kwargs), = served
    assert (engine.max_batch, engine.max_prefill_tokens) == (3, 64) and args == ("127.0.0.1", port)
    assert kwargs == {"log_level": "warning", "allow_adapter_updates": True, "adapter_dir": directory,
                      "max_adapters": 2, "max_body_bytes": 2 * 1024,
                      "default_template_options": {"enable_thinking": False}}


def test_serve_command_keeps_a_prefix_cache_by_default(saved, tmp_path, monkeypatch, capsys):
    """``qadapter serve`` keeps finished requests' KV (1 GiB) unless ``--prefix-cache 0``; a base that
    attends within a sliding window runs without it, said on stderr, and refuses a SIZE given."""
    from helpers import tiny_causal_lm, tiny_chat_tokenizer
    from qadapter.cli import main
    from qadapter.serving import server

    engines = []
    monkeypatch.setattr(server, "serve", lambda engine, *args, **kwargs: engines.append(engine))
    adapter = f"a={saved[2]['terse']}"
    assert main(["serve", "--adapter", adapter, "--port", str(free_port())]) == 0
    assert engines[-1].prefix_cache is not None and engines[-1].prefix_cache.budget == 1 << 30
    assert main(["serve", "--adapter", adapter, "--port", str(free_port()), "--prefix-cache", "0"]) == 0
    assert engines[-1].prefix_cache is None
    tokenizer = tiny_chat_tokenizer()
    tiny_causal_lm("mistral", vocab=len(tokenizer)).save_pretrained(tmp_path / "sliding")
    tokenizer.save_pretrained(tmp_path / "sliding")
    capsys.readouterr()
    assert main(["serve", "--base-model", str(tmp_path / "sliding"), "--port", str(free_port())]) == 0
    assert engines[-1].prefix_cache is None
    assert "the prefix cache is off: this model attends within a sliding window" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--base-model", str(tmp_path / "sliding"), "--port", str(free_port()), "--prefix-cache", "1MiB"])
    assert exc.value.code == 2 and "sliding window" in capsys.readouterr().err


def test_a_stream_whose_client_leaves_during_a_send_runs_its_cleanup_at_once():
    """Starlette (ASGI before 2.4) stops a stream whose client left while a chunk was being sent,
    with its generator suspended at a ``yield``: its cleanup, which cancels the requests and frees
    their batch rows, must run then, not when the generator is collected."""
    import asyncio

    from qadapter.serving.server import _ClosingStream

    closed = []

    async def body():
        try:
            yield "data: first\n\n"
            yield "data: never sent\n\n"
        finally:
            closed.append(True)

    async def serve() -> list:
        sent = asyncio.Event()

        async def receive():
            await sent.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.body" and message.get("body"):
                sent.set()
                await asyncio.sleep(30)  # the client is gone: the send never completes

        await _ClosingStream(body())({"type": "http", "asgi": {"spec_version": "2.3"}}, receive, send)
        return list(closed)  # before the loop's shutdown would finalize the generator

    assert asyncio.run(asyncio.wait_for(serve(), 10)) == [True]


def test_completion_text_decodes_a_window_yet_equals_the_whole_decode():
    """Characters split over byte-level tokens and leading spaces come out as a decode of all the
    tokens at once, however the tokens arrive."""
    from helpers import tiny_chat_tokenizer
    from qadapter.serving.engine import Request, completion_text

    tokenizer = tiny_chat_tokenizer()
    tokens = tokenizer("naïve café 🙂 the capital of France is Paris, 東京 too", add_special_tokens=False).input_ids
    request = Request(prompt=[1], adapter=None, max_tokens=len(tokens), emit=lambda event: None)
    seen = []
    for i, token in enumerate(tokens):
        request.tokens.append(token)
        seen.append(completion_text(tokenizer, request, final=i == len(tokens) - 1))
    whole = tokenizer.decode(tokens, skip_special_tokens=True)
    assert seen[-1] == whole
    assert all(whole.startswith(text) and "\ufffd" not in text for text in seen)


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_a_completion_continues_its_prompt_and_its_tokens_add_up_to_it(kind):
    """A SentencePiece decoder strips the word-start space of a text's first token: the completion
    text still continues its prompt as a decode of both at once does (" Paris", not "Paris"), and
    the answer tokens' texts (log-probs' tokens, their text offsets) add up to it."""
    from helpers import tiny_chat_tokenizer, tiny_sentencepiece_tokenizer
    from qadapter.serving.engine import Request, completion_text
    from qadapter.serving.server import token_bytes, token_text

    tokenizer = tiny_chat_tokenizer() if kind == "byte-level" else tiny_sentencepiece_tokenizer()
    whole = tokenizer("the capital of France is Paris, hello wörld", add_special_tokens=False).input_ids
    cut = next(i for i in range(len(whole)) if tokenizer.decode(whole[:i]) == "the capital of France is Paris,")
    prompt, answer = whole[:cut], whole[cut:]
    request = Request(prompt=prompt, adapter=None, max_tokens=len(answer), emit=lambda event: None)
    for i, token in enumerate(answer):
        request.tokens.append(token)
        completion_text(tokenizer, request, final=i == len(answer) - 1)
    assert request.text == " hello wörld"
    assert tokenizer.decode(prompt) + request.text == tokenizer.decode(whole)
    text, raw = token_text(tokenizer), token_bytes(tokenizer)
    assert "".join(text(t) for t in answer) == " hello w\ufffd\ufffdrld"  # ö: two byte tokens, each U+FFFD
    assert b"".join(raw(t) for t in answer).decode() == request.text


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_requests_joining_and_leaving_mid_run_decode_as_alone(family, tmp_path):
    """The engine's cache splicing and cutting, step by step: requests of different prompt lengths
    join a running batch at different steps and leave it at different steps (Gemma-2: soft cap,
    sliding-window layers); each gets the tokens it gets decoded alone."""
    from helpers import tiny_causal_lm

    paths = save_perturbed_adapters(tmp_path, {"a": dict(alpha_tilde=0.9), "b": dict(alpha_tilde=1.2)},
                                    lambda: tiny_causal_lm(family))
    decode_joining_and_leaving(AdapterSet.from_pretrained(paths, base_model=tiny_causal_lm(family)))


def test_stacks_join_and_leave_the_running_batch_as_alone(tmp_path):
    """Stacked adapters (a three-level request runs four rows, a base request one) joining and leaving
    beside a single adapter: the cache's rows follow each request's depth."""
    from helpers import save_three_level_stack, tiny_causal_lm

    levels = save_three_level_stack(tmp_path, tiny_causal_lm)
    adapter_set = AdapterSet.from_pretrained({"a": levels[0], "b": levels[2]}, tiny_causal_lm())
    assert adapter_set.depth("b") == 3
    decode_joining_and_leaving(adapter_set)


def test_the_prefill_budget_splits_admissions_and_reads_a_long_prompt_alone(saved, monkeypatch):
    """``max_prefill_tokens`` bounds what one prefill reads (prompt tokens times the rows a request runs:
    two for an adapter, one for the base): queued requests past it wait, first in line, for the next
    admission; a prompt over the budget is read alone. Each decodes as it does alone."""
    _, tokenizer, paths = saved
    adapter_set = AdapterSet.from_pretrained({"terse": paths["terse"]})
    adapter_set.peft_model.eval()
    engine = Engine(adapter_set, tokenizer, max_prefill_tokens=25)
    reads = []
    real = engine._prefill
    monkeypatch.setattr(engine, "_prefill", lambda new: reads.append([r.prompt[0] for r in new]) or real(new))
    # (first token as a label, prompt length, adapter): costs 10, 10, 10, 20, 60
    jobs = [(10, 5, "terse"), (11, 5, "terse"), (12, 5, "terse"), (13, 20, None), (14, 30, "terse")]
    requests = [Request(prompt=[first] + [5] * (n - 1), adapter=adapter, max_tokens=4, emit=lambda e: None)
                for first, n, adapter in jobs]
    for request in requests:
        engine.submit(request)
    assert re.search(r'^qadapter:num_requests_waiting\{model_name="[^"]+"\} 5\.0$', engine.metrics.render().decode(), re.M)
    engine_decode(engine, [])
    assert reads == [[10, 11], [12], [13], [14]]
    for request in requests:
        alone = Request(prompt=request.prompt, adapter=request.adapter, max_tokens=4, emit=lambda e: None)
        engine_decode(Engine(adapter_set, tokenizer), [alone])
        assert request.tokens == alone.tokens
    with pytest.raises(ValueError, match="max_prefill_tokens must be an integer >= 1 or None; got 0"):
        Engine(adapter_set, tokenizer, max_prefill_tokens=0)
    with pytest.raises(TypeError, match="max_batch must be an integer >= 1; got True"):  # not a batch of 1
        Engine(adapter_set, tokenizer, max_batch=True)


def test_the_engine_refuses_a_request_naming_its_field(saved):
    """What the engine cannot run is refused before it is queued, with the request's field at fault:
    what a server maps to the field of its client's request."""
    _, tokenizer, paths = saved
    engine = Engine(AdapterSet.from_pretrained({"terse": paths["terse"]}), tokenizer)
    engine.context_length = 32
    cases = [({"prompt": []}, "prompt", "at least one token"),
             ({"max_tokens": -1}, "max_tokens", "an integer >= 1"),
             ({"max_tokens": 0}, "max_tokens", "without echo"),
             ({"prompt": [5] * 30, "max_tokens": 3}, "max_tokens", "context length"),
             ({"prompt": [5] * 32, "max_tokens": 3}, "prompt", "context length"),  # no limit would do
             ({"prompt": [5] * 33, "max_tokens": 0, "echo": True}, "prompt", "context length"),
             ({"top_p": 0.0}, "top_p", r"a number in \(0, 1\]"),
             ({"adapter": "gone"}, "adapter", "'gone' is not loaded"),
             # each would fail inside a decoding step, ending every request of the running batch
             ({"prompt": "hello"}, "prompt", "a list of token ids; got str"),
             ({"prompt": torch.tensor([5, 6])}, "prompt", "a list of token ids; got Tensor"),
             ({"prompt": [5, 10**6]}, "prompt", r"integers in \[0, \d+\); got 1000000"),
             ({"prompt": [-1, 5]}, "prompt", "got -1"),
             ({"prompt": [5.0, 6.0]}, "prompt", "got 5.0"),
             ({"stop": "ab"}, "stop", "a tuple of non-empty strings; got 'ab'"),  # not a stop at each character
             ({"stop": ("",)}, "stop", "non-empty strings"),
             ({"stop": None}, "stop", "got None"),
             ({"emit": None}, "emit", "a function")]
    for fields, field, message in cases:
        request = Request(**{"prompt": [5, 6], "adapter": "terse", "max_tokens": 2, "emit": lambda e: None, **fields})
        with pytest.raises(RequestRefused, match=message) as info:
            engine.submit(request)
        assert info.value.field == field
        assert str(info.value) == info.value.args[0]  # not quoted, as a KeyError's message would be
        again = pickle.loads(pickle.dumps(info.value))  # sent between processes, it stays whole
        assert (type(again), str(again), again.field) == (RequestRefused, str(info.value), field)
    with pytest.raises(KeyError):  # an adapter not loaded, as callers caught it before
        engine.submit(Request(prompt=[5], adapter="gone", max_tokens=1, emit=lambda e: None))
    assert engine._pending.empty()
    # A tuple of ids (numpy's too) and a list of stops are taken as the list and the tuple.
    events = []
    request = Request(prompt=(5, np.int64(6)), adapter="terse", max_tokens=2, emit=events.append, stop=["zz"])
    engine_decode(engine, [request])
    assert len(request.tokens) == 2 and events[-1]["finish_reason"] == "length"


def test_the_engine_gives_the_model_back_in_the_modes_it_found(saved):
    """It decodes with every module in eval mode (no dropout), and gives each module back the mode
    its caller had when the engine stops: a model trained on after serving trains with dropout."""
    _, tokenizer, paths = saved
    adapter_set = AdapterSet.from_pretrained({"terse": paths["terse"]})
    model = adapter_set.peft_model
    for i, module in enumerate(model.modules()):  # some in train mode, some in eval
        module.training = i % 2 == 0
    caller = {name: module.training for name, module in model.named_modules()}
    engine = Engine(adapter_set, tokenizer).start()
    assert not any(module.training for module in model.modules())
    engine.stop()
    assert {name: module.training for name, module in model.named_modules()} == caller


def test_the_engine_keeps_a_train_mode_its_caller_set_while_it_ran(saved):
    """A module its caller put in train mode while the engine ran (a thread outliving stop's timeout
    ends after its caller went on to train) stays in train mode: only the modes the engine set are
    given back."""
    _, tokenizer, paths = saved
    adapter_set = AdapterSet.from_pretrained({"terse": paths["terse"]})
    model = adapter_set.peft_model
    model.eval()
    engine = Engine(adapter_set, tokenizer).start()
    model.train()  # the caller's, meanwhile
    engine.stop()
    assert all(module.training for module in model.modules())

def test_a_refusal_keeps_its_notes_through_pickle():
    refusal = RequestRefused("max_tokens must be an integer >= 1; got -1", "max_tokens")
    refusal.add_note("request 7 of the batch")
    again = pickle.loads(pickle.dumps(refusal))
    assert (type(again), again.args, again.field) == (RequestRefused, refusal.args, "max_tokens")
    assert again.__notes__ == ["request 7 of the batch"]


def test_a_prompt_asked_several_times_is_read_once(saved, monkeypatch):
    """``n`` choices (or lm-eval's repeated contexts): requests with the same prompt and model are
    prefilled as one row, whose cache rows are copied to each; each then decodes (and scores its echoed
    prompt, with its own number of alternatives) as it would alone."""
    _, tokenizer, paths = saved
    adapter_set = AdapterSet.from_pretrained({"terse": paths["terse"], "kind": paths["kind"]})
    engine = Engine(adapter_set, tokenizer, max_batch=8)
    read_rows = []
    real = adapter_set.read_prompts
    monkeypatch.setattr(adapter_set, "read_prompts",
                        lambda ids, *args, **kwargs: read_rows.append(ids.shape[0]) or real(ids, *args, **kwargs))
    same, other = (tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS[:2])
    events = [[] for _ in range(5)]
    jobs = [(same, "kind", 2), (same, "kind", 0), (same, "terse", 1), (other, "kind", 3), (same, "kind", 1)]
    requests = [Request(prompt=p, adapter=a, max_tokens=6, emit=events[i].append, echo=True, logprobs=k)
                for i, (p, a, k) in enumerate(jobs)]
    adapter_set.peft_model.eval()
    engine_decode(engine, requests)
    assert read_rows == [3]  # (same, kind), (same, terse), (other, kind)
    for i, request in enumerate(requests):
        alone_events = []
        alone = Request(prompt=request.prompt, adapter=request.adapter, max_tokens=6, emit=alone_events.append,
                        echo=True, logprobs=request.logprobs)
        engine_decode(Engine(adapter_set, tokenizer), [alone])
        assert request.tokens == alone.tokens, i
        got, want = events[i][0]["prompt_logprobs"], alone_events[0]["prompt_logprobs"]
        assert [len(e[2] or ()) for e in got[1:]] == [request.logprobs] * (len(request.prompt) - 1)
        torch.testing.assert_close(torch.tensor([e[1] for e in got[1:]]), torch.tensor([e[1] for e in want[1:]]))


@pytest.fixture
def adapter_dir(saved, tmp_path):
    """A directory of adapters (links to three saved ones) and a folder that holds none."""
    for name in ("formal", "kind", "brief"):
        (tmp_path / name).symlink_to(saved[2][name], target_is_directory=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").symlink_to(saved[2]["kind"], target_is_directory=True)
    return tmp_path


def test_an_adapter_directory_loads_models_on_first_use_and_unloads_the_least_recent(saved, solo_text, adapter_dir):
    """vLLM's filesystem resolver: a request for a folder of the adapter directory loads it and is answered
    as that adapter alone; with ``max_adapters`` loaded from there, the least recently used one makes room
    (the adapters loaded at start stay); names that are not a folder there are not models."""
    _, tokenizer, paths = saved
    engine = Engine(AdapterSet.from_pretrained({"terse": paths["terse"]}), tokenizer)
    for url, _ in running_server(engine, adapter_dir=adapter_dir, max_adapters=2):
        api = client(url)

        def answer(model):
            return api.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8, temperature=0).choices[0].text

        assert [m.id for m in api.models.list().data] == ["base", "terse"]
        before = int(time.time())
        assert answer("formal") == solo_text("formal", PROMPTS[1], 8)
        assert api.models.retrieve("formal").created >= before >= api.models.retrieve("base").created
        assert answer("kind") == solo_text("kind", PROMPTS[1], 8)
        assert answer("formal") == solo_text("formal", PROMPTS[1], 8)  # now the most recent of the two
        assert [m.id for m in api.models.list().data] == ["base", "terse", "formal", "kind"]
        assert answer("brief") == solo_text("brief", PROMPTS[1], 8)  # kind makes room
        assert [m.id for m in api.models.list().data] == ["base", "terse", "formal", "brief"]
        assert answer("kind") == solo_text("kind", PROMPTS[1], 8) and answer("terse") == solo_text("terse", PROMPTS[1], 8)
        assert engine.adapter_set.names == ["terse", "brief", "kind"]  # formal, the least recent, went
        for name in (".hidden", "../formal", "nope", str(adapter_dir / "formal"), "x" * 300):  # 300: too long a name
            with pytest.raises(openai.NotFoundError, match="does not exist") as exc:
                answer(name)
            assert exc.value.body["message"].endswith(  # not where the directory is
                "or a folder of the server's adapter directory (a saved adapter, loaded on first use)")
        with pytest.raises(openai.NotFoundError, match="a folder of the server's adapter directory"):
            api.models.retrieve("nope")
        with pytest.raises(openai.BadRequestError, match="unsupported field 'bogus'"):  # refused before it loads
            api.completions.create(model="formal", prompt=PROMPTS[1], max_tokens=8, extra_body={"bogus": 1})
        assert engine.adapter_set.names == ["terse", "brief", "kind"]
        with pytest.raises(openai.BadRequestError, match="'empty' of the adapter directory holds no adapter"):
            answer("empty")
        assert engine.adapter_set.names == ["terse", "brief", "kind"]  # checked before any made room for it


def test_an_adapter_directory_never_unloads_a_model_with_requests(saved, adapter_dir):
    """With ``max_adapters`` loaded from the directory and each answering a request, another one is refused
    (503) rather than taking a model away; requests arriving together for one unloaded adapter load it once."""
    from qadapter.library.defaults import load_base

    root, tokenizer, _ = saved
    engine = Engine(AdapterSet(load_base(str(root / "base"))[0], tokenizer=tokenizer), tokenizer)
    for url, _ in running_server(engine, adapter_dir=adapter_dir, max_adapters=1):
        api = client(url)
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda _: api.completions.create(model="kind", prompt=PROMPTS[0], max_tokens=4,
                                                                      temperature=0).choices[0].text, range(4)))
        assert len(set(together)) == 1 and engine.adapter_set.names == ["kind"]
        # A request for kind holds the engine at its first token until the unload that brief's load needs is queued.
        gate = threading.Event()
        engine.submit(Request(prompt=[5, 6, 7], adapter="kind", max_tokens=20, emit=lambda event: gate.wait(30)))
        with ThreadPoolExecutor(1) as pool:
            brief = pool.submit(lambda: httpx.post(f"{url}/completions", timeout=60,
                                                   json={"model": "brief", "prompt": PROMPTS[0], "max_tokens": 4}))
            deadline = time.monotonic() + 30
            while engine._between_steps.empty() and time.monotonic() < deadline:
                time.sleep(0.01)
            gate.set()
            refused = brief.result()
        assert refused.status_code == 503 and "have requests running" in refused.json()["error"]["message"]
        assert engine.wait_idle() and engine.adapter_set.names == ["kind"]
        api.completions.create(model="brief", prompt=PROMPTS[0], max_tokens=4)
        assert engine.adapter_set.names == ["brief"]


def test_adapter_directory_options_are_checked(saved, tmp_path, capsys):
    _, tokenizer, paths = saved
    engine = Engine(AdapterSet.from_pretrained({"terse": paths["terse"]}), tokenizer)
    with pytest.raises(ValueError, match="adapter_dir must be a directory"):
        Server(engine, adapter_dir=tmp_path / "nope")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="max_adapters bounds the adapters loaded from adapter_dir"):
            Server(engine, adapter_dir=tmp_path, max_adapters=bad)
    with pytest.raises(ValueError, match="without adapter_dir"):
        Server(engine, max_adapters=2)
    from qadapter.cli import main

    for args, message in ((["--max-adapters", "2"], "give --adapter-dir"),
                          (["--adapter-dir", str(tmp_path / "nope")], "no such directory")):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_adapters_load_and_unload_while_the_server_runs(updatable_server, saved, solo_text):
    """vLLM's routes: an adapter loaded while another one's request decodes answers as it would alone,
    and so does that request; an unloaded adapter is gone from the models and refused by name."""
    base_url, _ = updatable_server
    api, paths = client(base_url), saved[2]
    before = int(time.time())
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: api.completions.create(model="terse", prompt=PROMPTS[2], max_tokens=40,
                                                             temperature=0).choices[0].text)
        loaded = httpx.post(f"{base_url}/load_lora_adapter", json={"lora_name": "kind", "lora_path": str(paths["kind"])},
                            timeout=60)
        assert running.result() == solo_text("terse", PROMPTS[2], 40)
    assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'kind' added successfully."
    assert [m.id for m in api.models.list().data] == ["base", "terse", "formal", "kind"]
    assert api.models.retrieve("kind").created >= before >= api.models.retrieve("terse").created  # when it loaded
    answer = api.completions.create(model="kind", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert answer.choices[0].text == solo_text("kind", PROMPTS[0], 10)

    unloaded = httpx.post(f"{base_url}/unload_lora_adapter", json={"lora_name": "kind"}, timeout=60)
    assert unloaded.status_code == 200 and unloaded.text == "Success: LoRA adapter 'kind' removed successfully."
    assert [m.id for m in api.models.list().data] == ["base", "terse", "formal"]
    with pytest.raises(openai.NotFoundError, match="'kind' does not exist"):
        api.completions.create(model="kind", prompt=PROMPTS[0], max_tokens=4)
    assert api.completions.create(model="formal", prompt=PROMPTS[0], max_tokens=10,
                                  temperature=0).choices[0].text == solo_text("formal", PROMPTS[0], 10)


def test_a_stacked_adapter_is_loaded_and_served_as_its_stack_decodes(updatable_server, saved, tmp_path):
    """A stack (trained on a served adapter) loaded by vLLM's route answers as the stack decodes alone
    (``QAdapterModel.generate``), beside its own parent's requests; unloading it leaves the parent."""
    from helpers import perturb_adapter
    from qadapter.library.model import QAdapterModel

    base_url, _ = updatable_server
    root, tokenizer, paths = saved
    torch.manual_seed(0)  # PEFT draws the new LoRA's A
    stack = QAdapterModel.from_base(str(root / "base"), on=str(paths["terse"]), alpha_0=0.7, lora_dropout=0.0)
    perturb_adapter(stack, seed=9)
    stack.save_pretrained(tmp_path / "terse-v2")
    loaded = httpx.post(f"{base_url}/load_lora_adapter", json={"lora_name": "terse.v2", "lora_path": str(tmp_path / "terse-v2")},
                        timeout=60)
    assert loaded.status_code == 200, loaded.text
    ids = tokenizer(PROMPTS[3], add_special_tokens=False).input_ids
    alone = QAdapterModel.from_pretrained(tmp_path / "terse-v2").eval().generate(
        torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    api = client(base_url)
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(lambda m=m: api.completions.create(model=m, prompt=ids, max_tokens=8, temperature=0,
                                                               logprobs=0)) for m in ("terse.v2", "terse")]
        stacked, parent = [job.result().choices[0] for job in jobs]
    assert stacked.text == tokenizer.decode(alone, skip_special_tokens=True)
    assert stacked.logprobs.token_logprobs != parent.logprobs.token_logprobs  # the stack's own policy, not its parent's
    assert httpx.post(f"{base_url}/unload_lora_adapter", json={"lora_name": "terse.v2"}, timeout=60).status_code == 200
    assert [m.id for m in api.models.list().data] == ["base", "terse", "formal"]


@pytest.mark.parametrize("route, body, status, param, message", [
    ("load", {"lora_name": "x", "lora_path": "/nonexistent/adapter"}, 400, "lora_path", "no such folder"),
    ("load", {"lora_name": "terse", "lora_path": "TERSE"}, 400, "lora_name", "loaded already"),
    ("load", {"lora_name": "base", "lora_path": "TERSE"}, 400, "lora_name", "the base"),
    ("load", {"lora_name": "x", "lora_path": "TERSE", "lora_int_id": 3}, 400, "lora_int_id", "unknown field"),
    ("load", {"lora_path": "TERSE"}, 400, "lora_name", "must be a non-empty string"),
    ("unload", {"lora_name": "nope"}, 404, "lora_name", "is not loaded"),
    ("unload", {"lora_name": 3}, 400, "lora_name", "must be a non-empty string"),
])
def test_a_bad_adapter_update_is_refused_by_name(updatable_server, saved, route, body, status, param, message):
    body = {k: str(saved[2]["terse"]) if v == "TERSE" else v for k, v in body.items()}
    answer = httpx.post(f"{updatable_server[0]}/{route}_lora_adapter", json=body, timeout=60)
    error = answer.json()["error"]
    assert answer.status_code == status and error["param"] == param and message in error["message"]


def test_adapter_updates_are_taken_only_when_allowed(server, saved):
    answer = httpx.post(f"{server[0]}/load_lora_adapter", json={"lora_name": "x", "lora_path": str(saved[2]["kind"])})
    assert answer.status_code == 404


def test_an_adapter_with_requests_in_flight_is_not_unloaded(saved):
    """Its queued request would lose its model: the unload is refused until it has finished."""
    _, tokenizer, paths = saved
    engine = Engine(AdapterSet.from_pretrained({k: paths[k] for k in ("terse", "formal")}), tokenizer)
    engine.submit(Request(prompt=[5, 6, 7], adapter="terse", max_tokens=2, emit=lambda event: None))
    with pytest.raises(AdapterBusy, match="'terse' has 1 request"):
        engine.unload_adapter("terse")
    engine.start()
    assert engine.wait_idle()
    engine.unload_adapter("terse")  # between two steps of the running engine
    assert engine.adapter_set.names == ["formal"]
    with pytest.raises(RuntimeError, match="this engine was started already"):  # two threads on one batch
        engine.start()
    engine.stop()


def test_adapters_loaded_and_unloaded_under_new_names_leave_no_count_behind(saved):
    """A long-running server loads and unloads adapters under ever new names (the update routes, an
    adapter directory's evictions): the engine's counts of requests by adapter keep none of the names gone."""
    _, tokenizer, paths = saved
    engine = Engine(AdapterSet.from_pretrained({"terse": paths["terse"]}), tokenizer).start()
    for k in range(4):
        engine.load_adapter(f"turn{k}", paths["kind"])
        engine.submit(Request(prompt=[5, 6, 7], adapter=f"turn{k}", max_tokens=2, emit=lambda event: None))
        assert engine.wait_idle()
        engine.unload_adapter(f"turn{k}")
    engine.stop()
    assert dict(engine._in_flight) == {}


def test_an_unset_or_null_limit_is_the_default_within_the_context(server):
    """A null max_completion_tokens is an absent one (the client sends null for None); without a limit
    the default is capped at what the context leaves, as vLLM caps it, rather than refused."""
    api, engine = client(server[0]), server[1]
    chat = api.chat.completions.create(model="terse", messages=[{"role": "user", "content": PROMPTS[0]}],
                                       max_tokens=1, max_completion_tokens=None, temperature=0)
    assert chat.usage.completion_tokens == 1
    long_prompt = [7] * (engine.context_length - 3)  # room for 3 tokens: fewer than the default 16
    answer = api.completions.create(model="terse", prompt=long_prompt, temperature=0)
    assert answer.usage.prompt_tokens == len(long_prompt) and 1 <= answer.usage.completion_tokens <= 3
    # Several prompts: the default is what the longest one's context leaves, for each of them.
    both = api.completions.create(model="terse", prompt=[[7] * 3, long_prompt], temperature=0, logprobs=0)
    assert both.usage.prompt_tokens == 3 + len(long_prompt)
    assert all(1 <= len(choice.logprobs.tokens) <= 3 for choice in both.choices)
    with pytest.raises(openai.BadRequestError, match="context length") as info:
        api.completions.create(model="terse", prompt=[7] * engine.context_length, temperature=0)
    assert info.value.param == "prompt"
    # The field the client set is the one named: messages without a limit, the limit it set by either name.
    long_message = [{"role": "user", "content": "hello world " * engine.context_length}]
    with pytest.raises(openai.BadRequestError, match="context length") as info:
        api.chat.completions.create(model="terse", messages=long_message, temperature=0)
    assert info.value.param == "messages"
    short_message = [{"role": "user", "content": PROMPTS[0]}]
    with pytest.raises(openai.BadRequestError, match="context length") as info:
        api.chat.completions.create(model="terse", messages=short_message, temperature=0,
                                    max_completion_tokens=engine.context_length)
    assert info.value.param == "max_completion_tokens"


def test_a_text_prompt_starts_with_the_bos_its_tokenizer_starts_texts_with():
    """A Llama-style tokenizer starts every text with BOS, and training and ``generate`` read a plain
    prompt after it: so does a text prompt here (as vLLM's ``add_special_tokens`` default), scored as
    the same token ids given with it; ``add_special_tokens: false`` reads the text alone; a text that
    writes its BOS has it once. The echoed text is the prompt as given, the BOS at offset 0 taking no room."""
    from helpers import tiny_causal_lm, tiny_sentencepiece_tokenizer

    tokenizer = tiny_sentencepiece_tokenizer()
    base = tiny_causal_lm("llama", vocab=len(tokenizer))
    for base_url, _ in running_server(Engine(AdapterSet(base, tokenizer=tokenizer), tokenizer, max_batch=4)):
        api, text = client(base_url), "the capital of France"
        ids = tokenizer(text, add_special_tokens=False).input_ids
        bos = tokenizer.bos_token_id
        scored = api.completions.create(model="base", prompt=text, max_tokens=0, logprobs=0, echo=True)
        given = api.completions.create(model="base", prompt=[bos, *ids], max_tokens=0, logprobs=0, echo=True)
        got = scored.choices[0]
        assert scored.usage.prompt_tokens == len(ids) + 1 and got.text == text
        assert got.logprobs.tokens == given.choices[0].logprobs.tokens and got.logprobs.tokens[0] == "<s>"
        assert got.logprobs.token_logprobs[1:] == given.choices[0].logprobs.token_logprobs[1:]
        assert got.logprobs.text_offset[:2] == [0, 0]
        alone = api.completions.create(model="base", prompt=text, max_tokens=0, logprobs=0, echo=True,
                                       extra_body={"add_special_tokens": False})
        assert alone.usage.prompt_tokens == len(ids) and alone.choices[0].logprobs.tokens[0] != "<s>"
        written = api.completions.create(model="base", prompt="<s>" + text, max_tokens=0, echo=True)
        assert written.usage.prompt_tokens == len(ids) + 1
        with pytest.raises(openai.BadRequestError, match="add_special_tokens must be true or false; got \"yes\""):
            api.completions.create(model="base", prompt=text, max_tokens=1, extra_body={"add_special_tokens": "yes"})


def test_an_added_bos_moves_no_offset_of_an_answer_not_echoed():
    """The BOS added to a text prompt is at offset 0 of an echoed prompt only: without ``echo`` the
    answer's first token takes its room, so each token's offset is the text before it, streamed or whole."""
    from helpers import tiny_causal_lm, tiny_sentencepiece_tokenizer

    tokenizer = tiny_sentencepiece_tokenizer()
    base = tiny_causal_lm("llama", vocab=len(tokenizer))
    for base_url, _ in running_server(Engine(AdapterSet(base, tokenizer=tokenizer), tokenizer, max_batch=4)):
        api = client(base_url)
        answer = api.completions.create(model="base", prompt=["the capital", "of France"], n=2, max_tokens=4,
                                        temperature=0, logprobs=0)
        for choice in answer.choices:
            got = choice.logprobs
            assert len(got.tokens) >= 2
            assert got.text_offset == [sum(len(t) for t in got.tokens[:i]) for i in range(len(got.tokens))]
        pieces = [chunk.choices[0].logprobs for chunk in api.completions.create(
            model="base", prompt="the capital", max_tokens=4, temperature=0, logprobs=0, stream=True)
            if chunk.choices and chunk.choices[0].logprobs is not None]
        tokens = [t for piece in pieces for t in piece.tokens]
        assert len(tokens) >= 2
        assert [o for piece in pieces for o in piece.text_offset] == [sum(len(t) for t in tokens[:i])
                                                                       for i in range(len(tokens))]


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece_bos"])
def plain_base_server(request, tmp_path_factory):
    """A server over a tiny base (its tokenizer byte-level without a BOS, or SentencePiece adding Llama's
    BOS) with one adapter; (base_url, tokenizer, the same base loaded as a plain transformers model)."""
    from helpers import tiny_causal_lm, tiny_chat_tokenizer, tiny_sentencepiece_tokenizer
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp(f"plain_{request.param}")
    tokenizer = tiny_chat_tokenizer() if request.param == "byte_level" else tiny_sentencepiece_tokenizer()
    tiny_causal_lm("llama", vocab=len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    paths = save_perturbed_adapters(root, {"terse": ADAPTERS["terse"]}, root / "base")
    plain = AutoModelForCausalLM.from_pretrained(root / "base").float().eval()
    for url, _ in running_server(Engine(AdapterSet.from_pretrained(paths), tokenizer, max_batch=8)):
        yield url, tokenizer, plain


def test_the_base_echoes_and_answers_as_a_plain_transformers_model(plain_base_server):
    """Model ``base``, differentially against plain transformers on the same weights: a text prompt is
    the tokenizer's own encoding (its BOS where it adds one), the greedy answer is ``generate``'s, and
    the echoed prompt's and the answer's log-probs are ``log_softmax`` of one forward over prompt and
    answer (within 1e-4), the first token's none; a token-id prompt is taken as given."""
    from qadapter.serving.server import token_text

    url, tokenizer, plain = plain_base_server
    api = client(url)
    eos = tokenizer.eos_token_id
    text_of = token_text(tokenizer)
    for prompt in ["the capital of France", "hello world the capital of France is Paris", "Rome"]:
        ids = tokenizer(prompt).input_ids  # as training and generate read a text: special tokens added
        with torch.no_grad():
            out = plain.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id or 0)[0, len(ids):].tolist()
        answer_ids = out[:out.index(eos)] if eos in out else out
        with torch.no_grad():
            logprobs = torch.log_softmax(plain(torch.tensor([ids + answer_ids])).logits[0, :-1].float(), -1)
        want = logprobs.gather(1, torch.tensor(ids[1:] + answer_ids)[:, None])[:, 0]
        for given in (prompt, ids):
            got = api.completions.create(model="base", prompt=given, max_tokens=6, temperature=0, logprobs=1,
                                         echo=True).choices[0]
            answer = tokenizer.decode(answer_ids, skip_special_tokens=True)
            assert got.text.endswith(answer) and len(got.logprobs.tokens) == len(ids) + len(answer_ids)
            if given is prompt:
                assert got.text == prompt + answer
            assert got.logprobs.token_logprobs[0] is None
            assert got.logprobs.tokens == [text_of(t) for t in ids + answer_ids]  # in order, the prompt's own first
            torch.testing.assert_close(torch.tensor(got.logprobs.token_logprobs[1:]), want, rtol=0, atol=1e-4)
            alone = api.completions.create(model="base", prompt=given, max_tokens=6, temperature=0).choices[0]
            assert alone.text == answer
            assert alone.finish_reason == ("stop" if eos in out else "length")
