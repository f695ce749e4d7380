#!/usr/bin/env python3
"""End-to-end checks of a running `silica serve` with the official `openai` Python SDK.

    python tests/openai/test_openai_sdk.py http://127.0.0.1:PORT/v1

The server must serve the demo model `qwen2.5-coder-0.5b` (alias `demo`). Every check prints
one line ("ok  name" or "FAIL name: reason"); the last line is "N passed, M failed" and the
exit status is 1 when any check failed. Generations are kept short (the CI machine decodes
at about 20 tokens/s on two cores).

Run by crates/cli/tests/openai_sdk.rs (`cargo test -p silica --test openai_sdk`).
"""

import functools
import json
import sys
import traceback

import openai

MODEL = "qwen2.5-coder-0.5b"
ALIAS = "demo"

if len(sys.argv) != 2:
    sys.exit(f"usage: {sys.argv[0]} BASE_URL   (e.g. http://127.0.0.1:1234/v1)")
BASE_URL = sys.argv[1]
client = openai.OpenAI(base_url=BASE_URL, api_key="unused", max_retries=0, timeout=120)

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def eq(got, want, what):
    expect(got == want, f"{what}: expected {want!r}, got {got!r}")


def user(text):
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------
# Requests shared by several checks (cached: each is generated once).

FRANCE = user("What is the capital of France?")
COUNT = user("Count from 1 to 10 separated by commas.")
LONG = user("Write a long, detailed essay about the history of the Roman Empire.")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris? Use the tool."},
]


@functools.lru_cache(maxsize=None)
def france_raw():
    """The greedy non-streamed answer to FRANCE: (raw response, parsed completion)."""
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32)
    return raw, raw.parse()


@functools.lru_cache(maxsize=None)
def completion_text():
    return client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=16, temperature=0)


def sampled(prompt, seed):
    r = client.chat.completions.create(model=MODEL, messages=user(prompt), temperature=1.0, seed=seed, max_tokens=16)
    return r.choices[0].message.content


def check_usage(usage, what):
    expect(usage is not None, f"{what}: no usage")
    expect(usage.prompt_tokens > 0, f"{what}: prompt_tokens {usage.prompt_tokens} <= 0")
    expect(usage.completion_tokens > 0, f"{what}: completion_tokens {usage.completion_tokens} <= 0")
    eq(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens, f"{what}: total_tokens (prompt + completion)")


def error_of(exc):
    """The `error` object of an API error's JSON body."""
    body = exc.response.json()
    expect(isinstance(body, dict) and isinstance(body.get("error"), dict), f"error body is not {{\"error\": {{...}}}}: {body!r}")
    err = body["error"]
    for key in ("message", "type", "param", "code"):
        expect(key in err, f"error object lacks `{key}`: {err!r}")
    expect(isinstance(err["message"], str) and err["message"], f"empty error message: {err!r}")
    # The SDK exposes the same object as `e.body`.
    eq(exc.body.get("param") if isinstance(exc.body, dict) else None, err["param"], "e.body['param'] vs the response's error.param")
    return err


# ---------------------------------------------------------------------------------------------
# Chat completions


@check
def chat_non_streaming():
    raw, r = france_raw()
    route = raw.headers.get("x-silica-route")
    expect(route, f"no x-silica-route header (headers: {dict(raw.headers)!r})")
    eq(r.object, "chat.completion", "object")
    eq(r.model, MODEL, "model")
    eq(len(r.choices), 1, "number of choices")
    c = r.choices[0]
    eq(c.index, 0, "choices[0].index")
    eq(c.message.role, "assistant", "message.role")
    expect(c.message.content and "Paris" in c.message.content, f"content does not mention Paris: {c.message.content!r}")
    eq(c.finish_reason, "stop", "finish_reason")
    expect(not c.message.tool_calls, f"unexpected tool_calls: {c.message.tool_calls!r}")
    check_usage(r.usage, "usage")
    expect(r.usage.completion_tokens <= 32, f"completion_tokens {r.usage.completion_tokens} > max_tokens 32")


@check
def chat_streaming_include_usage():
    _, ref = france_raw()
    stream = client.chat.completions.create(
        model=MODEL, messages=FRANCE, temperature=0, max_tokens=32, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    expect(len(chunks) >= 3, f"only {len(chunks)} chunks")
    for ch in chunks:
        eq(ch.object, "chat.completion.chunk", "chunk object")
        eq(ch.model, MODEL, "chunk model")
    eq(len({ch.id for ch in chunks}), 1, "number of distinct chunk ids")
    with_choices = [ch for ch in chunks if ch.choices]
    expect(with_choices, "no chunk with choices")
    eq(with_choices[0].choices[0].delta.role, "assistant", "first delta's role")
    text = "".join(c.delta.content or "" for ch in with_choices for c in ch.choices)
    eq(text, ref.choices[0].message.content, "streamed text vs the non-streamed greedy answer")
    finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason is not None]
    eq(finishes, ["stop"], "finish_reasons over the stream")
    last = chunks[-1]
    eq(last.choices, [], "last chunk's choices")
    check_usage(last.usage, "last chunk's usage")
    eq(last.usage.completion_tokens, ref.usage.completion_tokens, "streamed completion_tokens vs non-streamed")
    eq(last.usage.prompt_tokens, ref.usage.prompt_tokens, "streamed prompt_tokens vs non-streamed")
    for ch in chunks[:-1]:
        eq(ch.usage, None, "usage on a chunk before the last")


@check
def chat_streaming_without_usage():
    _, ref = france_raw()
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=32, stream=True))
    expect(all(ch.choices for ch in chunks), "a chunk without choices although include_usage was not asked for")
    expect(all(ch.usage is None for ch in chunks), "usage sent although include_usage was not asked for")
    text = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    eq(text, ref.choices[0].message.content, "streamed text vs the non-streamed greedy answer")


# ---------------------------------------------------------------------------------------------
# Completions


@check
def completions_non_streaming():
    r = completion_text()
    eq(r.object, "text_completion", "object")
    eq(r.model, MODEL, "model")
    eq(len(r.choices), 1, "number of choices")
    c = r.choices[0]
    expect(c.text and c.text.strip(), f"empty text: {c.text!r}")
    expect(c.finish_reason in ("stop", "length"), f"finish_reason {c.finish_reason!r}")
    check_usage(r.usage, "usage")
    expect(r.usage.completion_tokens <= 16, f"completion_tokens {r.usage.completion_tokens} > max_tokens 16")
    if c.finish_reason == "length":
        eq(r.usage.completion_tokens, 16, "completion_tokens with finish_reason length")


@check
def completions_streaming():
    ref = completion_text()
    chunks = list(client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=16, temperature=0, stream=True))
    expect(chunks, "no chunks")
    for ch in chunks:
        eq(ch.object, "text_completion", "chunk object")
    text = "".join(c.text for ch in chunks for c in ch.choices)
    eq(text, ref.choices[0].text, "streamed text vs non-streamed")
    finishes = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason is not None]
    eq(finishes, [ref.choices[0].finish_reason], "finish_reasons over the stream")


# ---------------------------------------------------------------------------------------------
# Models


@check
def models_list_and_retrieve():
    ids = [m.id for m in client.models.list()]
    expect(MODEL in ids, f"{MODEL} not in models.list(): {ids!r}")
    m = client.models.retrieve(MODEL)
    eq(m.id, MODEL, "models.retrieve(name).id")
    eq(m.object, "model", "models.retrieve(name).object")
    a = client.models.retrieve(ALIAS)
    eq(a.id, MODEL, f"models.retrieve({ALIAS!r}).id")


@check
def chat_by_alias():
    r = client.chat.completions.create(model=ALIAS, messages=FRANCE, temperature=0, max_tokens=4)
    eq(r.model, MODEL, "model of a request by alias")


# ---------------------------------------------------------------------------------------------
# Stop sequences and lengths


@check
def stop_sequences():
    free = client.chat.completions.create(model=MODEL, messages=COUNT, temperature=0, max_tokens=32)
    text = free.choices[0].message.content
    expect("5" in text, f"the unstopped answer does not contain '5' (cannot test the stop): {text!r}")
    r = client.chat.completions.create(model=MODEL, messages=COUNT, temperature=0, max_tokens=32, stop=["5"])
    c = r.choices[0]
    expect("5" not in c.message.content, f"content contains the stop string: {c.message.content!r}")
    eq(c.finish_reason, "stop", "finish_reason")
    expect(text.startswith(c.message.content), f"stopped text {c.message.content!r} is not a prefix of the unstopped {text!r}")
    eq(c.message.content, text[: text.index("5")], "stopped text vs the unstopped text cut before '5'")


@check
def finish_length_max_tokens():
    r = client.chat.completions.create(model=MODEL, messages=LONG, temperature=0, max_tokens=3)
    eq(r.choices[0].finish_reason, "length", "finish_reason (max_tokens=3)")
    eq(r.usage.completion_tokens, 3, "completion_tokens (max_tokens=3)")
    expect(r.choices[0].message.content, "empty content")
    r2 = client.chat.completions.create(model=MODEL, messages=LONG, temperature=0, max_completion_tokens=3)
    eq(r2.choices[0].finish_reason, "length", "finish_reason (max_completion_tokens=3)")
    eq(r2.usage.completion_tokens, 3, "completion_tokens (max_completion_tokens=3)")
    eq(r2.choices[0].message.content, r.choices[0].message.content, "content with max_completion_tokens vs max_tokens")


# ---------------------------------------------------------------------------------------------
# Sampling


@check
def seed_determinism():
    prompts = [
        "Write a short poem about the sea.",
        "Name some colors.",
        "Tell me a fun fact.",
    ]
    a = sampled(prompts[0], 1234)
    b = sampled(prompts[0], 1234)
    eq(b, a, "second answer with seed 1234")
    expect(a, "empty answer")
    differs = []
    for i, p in enumerate(prompts):
        x = a if i == 0 else sampled(p, 1234)
        y = sampled(p, 1235)
        differs.append(x != y)
        if x != y:
            break
    expect(any(differs), "seed 1235 gave the same text as seed 1234 for all three prompts")


@check
def n_two_choices():
    r = client.chat.completions.create(model=MODEL, messages=LONG, temperature=1.0, seed=7, n=2, max_tokens=8)
    eq([c.index for c in r.choices], [0, 1], "choice indexes")
    for c in r.choices:
        expect(c.message.content, f"choice {c.index}: empty content")
        eq(c.finish_reason, "length", f"choice {c.index}: finish_reason (8 tokens of a long essay)")
    # Both choices ran to max_tokens, so each has exactly 8 tokens.
    eq(r.usage.completion_tokens, 8 + 8, "completion_tokens (sum over both choices)")
    check_usage(r.usage, "usage")
    expect(r.choices[0].message.content != r.choices[1].message.content, f"both choices sampled the same text: {r.choices[0].message.content!r}")

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=LONG, temperature=1.0, seed=7, n=2, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    texts = {0: "", 1: ""}
    finishes = {0: [], 1: []}
    for ch in chunks:
        for c in ch.choices:
            expect(c.index in texts, f"delta with index {c.index}")
            texts[c.index] += c.delta.content or ""
            if c.finish_reason is not None:
                finishes[c.index].append(c.finish_reason)
    for i in (0, 1):
        expect(texts[i], f"no content deltas for index {i}")
        eq(finishes[i], ["length"], f"finish_reasons of index {i}")
        eq(texts[i], r.choices[i].message.content, f"streamed choice {i} vs non-streamed (same seed)")
    eq(chunks[-1].usage.completion_tokens, 16, "streamed completion_tokens")


@check
def chat_logprobs():
    r = client.chat.completions.create(model=MODEL, messages=LONG, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3)
    c = r.choices[0]
    expect(c.logprobs is not None and c.logprobs.content is not None, f"no logprobs.content: {c.logprobs!r}")
    entries = c.logprobs.content
    eq(len(entries), r.usage.completion_tokens, "logprobs entries vs completion_tokens")
    for k, e in enumerate(entries):
        expect(e.logprob <= 0, f"entry {k}: logprob {e.logprob} > 0")
        eq(len(e.top_logprobs), 3, f"entry {k}: number of top_logprobs")
        tops = [t.logprob for t in e.top_logprobs]
        expect(all(t <= 0 for t in tops), f"entry {k}: a top logprob > 0: {tops}")
        expect(tops == sorted(tops, reverse=True), f"entry {k}: top_logprobs not in descending order: {tops}")
        eq(e.token, e.top_logprobs[0].token, f"entry {k}: greedy token vs the most likely")
        expect(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-4, f"entry {k}: logprob {e.logprob} vs top {e.top_logprobs[0].logprob}")
        expect(e.bytes is not None, f"entry {k}: no bytes")
        try:
            decoded = bytes(e.bytes).decode("utf-8")
        except UnicodeDecodeError:
            decoded = None  # part of a multi-byte character: the token text cannot match it
        if decoded is not None:
            eq(decoded, e.token, f"entry {k}: bytes vs token")
    eq(c.finish_reason, "length", "finish_reason (5 tokens of a long essay)")
    eq(len(entries), 5, "number of logprobs entries")
    eq("".join(e.token for e in entries), c.message.content, "concatenated tokens vs content")


# ---------------------------------------------------------------------------------------------
# Tools


@check
def tool_call_round_trip():
    r = client.chat.completions.create(model=MODEL, messages=TOOL_MESSAGES, tools=TOOLS, temperature=0, max_tokens=64)
    c = r.choices[0]
    eq(c.finish_reason, "tool_calls", "finish_reason")
    calls = c.message.tool_calls or []
    eq(len(calls), 1, "number of tool calls")
    call = calls[0]
    eq(call.type, "function", "tool call type")
    eq(call.function.name, "get_weather", "tool call name")
    expect(call.id, "tool call without id")
    args = json.loads(call.function.arguments)
    expect("Paris" in args.get("city", ""), f"arguments do not name Paris: {call.function.arguments!r}")

    messages = TOOL_MESSAGES + [
        c.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "{\"temperature_c\": 21, \"sky\": \"sunny\"}"},
    ]
    f = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0, max_tokens=48)
    fc = f.choices[0]
    expect(fc.finish_reason in ("stop", "length"), f"final finish_reason {fc.finish_reason!r} (message {fc.message!r})")
    expect(not fc.message.tool_calls, f"final answer has tool_calls: {fc.message.tool_calls!r}")
    text = fc.message.content or ""
    expect(text.strip(), "empty final answer")
    expect("21" in text or "sunny" in text.lower(), f"final answer mentions neither 21 nor sunny: {text!r}")


@check
def tool_call_streaming():
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=TOOL_MESSAGES, tools=TOOLS, temperature=0, max_tokens=64, stream=True)
    )
    names = []
    args = ""
    finishes = []
    for ch in chunks:
        for c in ch.choices:
            for tc in c.delta.tool_calls or []:
                eq(tc.index, 0, "tool call delta index")
                if tc.function and tc.function.name:
                    names.append(tc.function.name)
                if tc.function and tc.function.arguments:
                    args += tc.function.arguments
            if c.finish_reason is not None:
                finishes.append(c.finish_reason)
    eq(names, ["get_weather"], "tool call names in the deltas")
    expect("Paris" in json.loads(args).get("city", ""), f"streamed arguments do not name Paris: {args!r}")
    eq(finishes, ["tool_calls"], "finish_reasons over the stream")


# ---------------------------------------------------------------------------------------------
# Errors


@check
def unknown_model_not_found():
    try:
        client.chat.completions.create(model="no-such-model", messages=FRANCE, max_tokens=4)
    except openai.NotFoundError as e:
        err = error_of(e)
        eq(e.status_code, 404, "status")
        eq(err["param"], "model", "error.param")
    else:
        raise AssertionError("no error for an unknown model")
    try:
        client.models.retrieve("no-such-model")
    except openai.NotFoundError as e:
        eq(error_of(e)["param"], "model", "error.param (models.retrieve)")
    else:
        raise AssertionError("models.retrieve of an unknown model succeeded")


BAD_REQUESTS = [
    ("temperature", dict(messages=FRANCE, temperature=5)),
    ("top_p", dict(messages=FRANCE, top_p=0)),
    ("n", dict(messages=FRANCE, n=0)),
    ("max_tokens", dict(messages=FRANCE, max_tokens=-1)),
    ("messages", dict(messages=[])),
    ("top_logprobs", dict(messages=FRANCE, logprobs=True, top_logprobs=50)),
    ("response_format", dict(messages=FRANCE, response_format={"type": "json_object"})),
]


def make_bad_request_check(param, kwargs):
    def bad_request():
        args = dict(model=MODEL, max_tokens=4)
        args.update(kwargs)
        try:
            client.chat.completions.create(**args)
        except openai.BadRequestError as e:
            err = error_of(e)
            eq(e.status_code, 400, "status")
            eq(err["type"], "invalid_request_error", "error.type")
            eq(err["param"], param, "error.param")
        else:
            raise AssertionError(f"no error for {kwargs!r}")

    bad_request.__name__ = f"bad_request_{param}"
    return bad_request


for _param, _kwargs in BAD_REQUESTS:
    check(make_bad_request_check(_param, _kwargs))


# ---------------------------------------------------------------------------------------------


def main():
    passed = failed = 0
    for fn in CHECKS:
        try:
            fn()
        except AssertionError as e:
            failed += 1
            print(f"FAIL {fn.__name__}: {e}", flush=True)
        except Exception as e:  # an SDK or HTTP error is a failure of the check too
            failed += 1
            print(f"FAIL {fn.__name__}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
        else:
            passed += 1
            print(f"ok  {fn.__name__}", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
