"""llava-serve through the official openai client on loopback, with the embedded shapes model (it answers about
shapes and colours, so answers can be checked against the image)."""

import base64
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from engine import ChatEngine
from engine.chat import Progress
from engine.media import MediaPolicy
from engine.server import create_app, running

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
MODEL = "shapes-llava"


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def question(text: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


CIRCLES = question("What color is the circle?", data_url(EXAMPLES / "red_circle_blue_square.png"))


@pytest.fixture(scope="module")
def engine():
    return ChatEngine(str(ROOT / "checkpoints" / MODEL), device="cpu")


@pytest.fixture(scope="module")
def client(engine):
    with running(create_app(engine, MODEL, max_body_bytes=2_000_000)) as base_url:
        yield openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)


def ask(client, messages, **options) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=messages, **{"temperature": 0, "max_tokens": 40, **options})


def streamed(client, messages, **options) -> tuple[str, object]:
    chunks = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}, **options)
    text, usage = "", None
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    return text, usage


def test_an_image_question_is_answered_about_that_image(client):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve(MODEL).model_extra["max_model_len"] == 1024  # as vLLM's model card says it
    assert refused(lambda: client.models.retrieve("gpt-4o")).body["code"] == "model_not_found"
    red = ask(client, CIRCLES)
    assert "red" in red.choices[0].message.content and red.choices[0].finish_reason == "stop"
    yellow = ask(client, question("What color is the circle?", data_url(EXAMPLES / "three_shapes.png")))
    assert "yellow" in yellow.choices[0].message.content  # the same question, another image: another answer
    assert red.usage.prompt_tokens > 16 and 0 < red.usage.completion_tokens <= 40


def test_streaming_equals_non_streaming_at_temperature_0(client):
    whole = ask(client, CIRCLES)
    text, usage = streamed(client, CIRCLES)
    assert text == whole.choices[0].message.content
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)


def test_a_follow_up_with_history_reuses_the_cached_prefix(client):
    first = ask(client, CIRCLES).choices[0].message.content
    follow_up = CIRCLES + [{"role": "assistant", "content": first}, {"role": "user", "content": "Where is the square?"}]
    answer = ask(client, follow_up)
    assert "square" in answer.choices[0].message.content
    assert answer.usage.prompt_tokens_details.cached_tokens > 16  # the system prompt and the first question at least
    again = ask(client, follow_up)  # a retry: everything but the last prompt token comes from the cache
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == answer.choices[0].message.content


def test_a_conversation_without_images_is_answered_and_an_image_can_join_it(client):
    text_only = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a circle?"}]
    whole = ask(client, text_only)
    assert whole.choices[0].message.content and whole.usage.completion_tokens > 0
    text, usage = streamed(client, text_only)
    assert text == whole.choices[0].message.content and usage.prompt_tokens == whole.usage.prompt_tokens
    assert ask(client, text_only).usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1
    joined = text_only + [{"role": "assistant", "content": whole.choices[0].message.content},
                          {"role": "user", "content": CIRCLES[0]["content"]}]
    answer = ask(client, joined)
    assert "red" in answer.choices[0].message.content
    assert answer.usage.prompt_tokens_details.cached_tokens >= whole.usage.prompt_tokens - 1  # the text before the image


def test_stop_strings_and_token_limits(client):
    full = ask(client, CIRCLES).choices[0].message.content  # "The circle is red."
    cut = ask(client, CIRCLES, stop=[" is"])
    assert cut.choices[0].message.content == full.split(" is")[0] and cut.choices[0].finish_reason == "stop"
    short = ask(client, CIRCLES, max_completion_tokens=2)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


def conversations() -> list[list[dict]]:
    texts = ["What color is the circle?", "How many shapes are in the image?", "Where is the yellow triangle?",
             "Describe the image.", "Is there a blue square in the image?", "What color is the square?"]
    images = sorted(EXAMPLES.glob("*.png"))
    return [question(text, data_url(images[index % len(images)])) for index, text in enumerate(texts + texts[:2])]


def test_a_stream_sends_what_is_ready_at_once_in_one_write():
    """The role goes with the first text, and the finish reason, the usage and [DONE] together: a write per event
    was a send here and a read in the client each."""
    import asyncio
    import json

    from engine.openai_responses import ChatCompletion
    from engine.server import Release, ThreadedAnswer, events

    def answer():
        yield Progress("A red", prompt_tokens=9, cached_tokens=0, completion_tokens=2)
        yield Progress("A red circle.", prompt_tokens=9, cached_tokens=0, completion_tokens=4, finish_reason="stop")

    async def writes():
        state = {"active": 1}
        release = Release(state)
        release.answer = ThreadedAnswer(answer())
        release.answer.read_first()
        first = await release.answer.next()
        return [write async for write in events([release], first, ChatCompletion(MODEL, with_usage=True))], state

    sent, state = asyncio.run(writes())
    events_of = [[json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in write.split("\n\n") if line]
                 for write in sent]
    assert len(events_of) == 2, sent
    assert [(event["choices"][0]["delta"]) for event in events_of[0]] == [{"role": "assistant", "content": ""}, {"content": "A red"}]
    finish, usage, done = events_of[1][1:]
    assert events_of[1][0]["choices"][0]["delta"] == {"content": " circle."} and finish["choices"][0]["finish_reason"] == "stop"
    assert usage["usage"]["completion_tokens"] == 4 and done == "[DONE]" and state["active"] == 0


def test_concurrent_greedy_streams_each_equal_their_answer_alone(client, engine):
    requests = conversations()
    alone = [ask(client, messages).choices[0].message.content for messages in requests]
    engine.scheduler.peak_batch = 0
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda messages: streamed(client, messages)[0], requests))
    assert together == alone
    assert engine.scheduler.peak_batch > 1  # they did decode in one batch


def test_a_seed_gives_the_same_sample_alone_and_in_a_batch(client):
    sample = {"temperature": 1.0, "seed": 7, "max_tokens": 30}
    kwargs = {"model": MODEL, "messages": CIRCLES, **sample}
    alone = client.chat.completions.create(**kwargs).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(client.chat.completions.create, model=MODEL, messages=messages, temperature=1.0, max_tokens=30)
                  for messages in conversations()[:3]]
        again = pool.submit(client.chat.completions.create, **kwargs).result().choices[0].message.content
        [other.result() for other in others]
    assert again == alone


def png_header(width: int, height: int) -> bytes:
    """A 70-byte PNG whose header declares width x height pixels: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def refused(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()
    return caught.value


def test_bad_input_gets_openai_errors_while_other_streams_go_on(client):
    requests = conversations()[:4]
    alone = [ask(client, messages).choices[0].message.content for messages in requests]
    streams = [client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=40, stream=True)
               for messages in requests]
    firsts = [next(iter(stream)) for stream in streams]  # every stream is open
    bomb = "data:image/png;base64," + base64.b64encode(png_header(8_000, 8_000)).decode()
    cases = [
        (400, "invalid_image", lambda: ask(client, question("Hi?", "data:image/png;base64,not base64!"))),
        (400, None, lambda: ask(client, question("Hi?", "data:image/png;base64," + base64.b64encode(b"GIF89a junk").decode()))),
        (400, None, lambda: ask(client, question("Hi?", bomb))),
        (400, "invalid_image", lambda: ask(client, question("Hi?", "https://example.com/cat.png"))),  # URLs are off
        (400, "invalid_image", lambda: ask(client, question("Hi?", (EXAMPLES / "three_shapes.png").as_uri()))),  # files too
        (400, None, lambda: ask(client, [{"role": "assistant", "content": "Hello!"}, *CIRCLES])),  # LLaVA's turns start with a user's
        (400, None, lambda: ask(client, [{"role": "assistant", "content": [{"type": "image_url", "image_url": CIRCLES[0]["content"][1]["image_url"]}]}])),
        (400, None, lambda: ask(client, CIRCLES, temperature=3)),
        (404, "model_not_found", lambda: client.chat.completions.create(model="gpt-4o", messages=CIRCLES)),
        (413, "request_too_large", lambda: ask(client, question("x" * 2_500_000, CIRCLES[0]["content"][1]["image_url"]["url"]))),
    ]
    for status, code, call in cases:
        error = refused(call)
        assert error.status_code == status and set(error.body) == {"message", "type", "param", "code"}, error.body
        assert error.body["type"] == "invalid_request_error" and error.body["message"]
        if code:
            assert error.body["code"] == code
    assert "8000x8000" in refused(cases[2][2]).body["message"]  # refused from its header, before decoding
    raw = httpx.post(str(client.base_url) + "chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "error" in raw.json()
    assert httpx.get(str(client.base_url) + "nowhere").json()["error"]["message"]
    texts = []
    for first, stream in zip(firsts, streams):
        texts.append("".join(chunk.choices[0].delta.content or "" for chunk in [first, *stream] if chunk.choices))
    assert texts == alone


class Gate:
    """An engine whose answers wait for `release`: requests stay in flight as long as a test needs."""

    def __init__(self):
        self.release, self.entered = threading.Event(), threading.Event()

    def generate(self, messages, image, sampling, stop=(), interval=0.0, cancel=None, prompting=None):
        self.entered.set()
        assert self.release.wait(30)
        yield Progress("ok", prompt_tokens=3, cached_tokens=0, completion_tokens=1, finish_reason="stop")


def test_a_full_server_answers_503_and_recovers():
    gate = Gate()
    with running(create_app(gate, MODEL, max_concurrent=1)) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(ask, client, CIRCLES)
            assert gate.entered.wait(30)
            busy = refused(lambda: ask(client, CIRCLES))
            assert busy.status_code == 503 and busy.body["code"] == "queue_full"
            assert busy.response.headers["retry-after"] == "1"  # the openai client's retry waits that long
            gate.release.set()
            assert first.result().choices[0].message.content == "ok"
        assert ask(client, CIRCLES).choices[0].message.content == "ok"


class SlowGate(Gate):
    """Its answers give a first chunk, then wait for `release` before the end; `closed` once the server let go."""

    def __init__(self):
        super().__init__()
        self.closed = threading.Event()

    def generate(self, messages, image, sampling, stop=(), interval=0.0, cancel=None, prompting=None):
        try:
            yield Progress("first", prompt_tokens=3, cached_tokens=0, completion_tokens=1)
            self.entered.set()
            assert self.release.wait(30)
            yield Progress("first and last", prompt_tokens=3, cached_tokens=0, completion_tokens=2, finish_reason="stop")
        finally:
            self.closed.set()


def test_a_client_that_leaves_mid_stream_frees_its_place():
    gate = SlowGate()
    with running(create_app(gate, MODEL, max_concurrent=1)) as base_url:
        body = {"model": MODEL, "messages": CIRCLES, "stream": True}
        with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=30) as response:
            assert next(response.iter_lines()).startswith("data: ")
            assert gate.entered.wait(30)
        gate.release.set()  # the client is gone; the server notices and lets go of the answer
        assert gate.closed.wait(30)
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
        for _ in range(100):  # bounded: the place is freed right after the answer is closed
            try:
                assert ask(client, CIRCLES).choices[0].message.content == "first and last"
                break
            except openai.APIStatusError as error:
                assert error.status_code == 503
                time.sleep(0.05)
        else:
            pytest.fail("the server never freed the departed client's place")


def test_local_files_only_inside_the_allowed_folder(engine, tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    (allowed / "shapes.png").write_bytes((EXAMPLES / "red_circle_blue_square.png").read_bytes())
    (outside / "secret.png").write_bytes((EXAMPLES / "three_shapes.png").read_bytes())
    (allowed / "link.png").symlink_to(outside / "secret.png")
    with running(create_app(engine, MODEL, MediaPolicy(allowed_local_path=allowed))) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
        answer = ask(client, question("What color is the circle?", (allowed / "shapes.png").as_uri()))
        assert "red" in answer.choices[0].message.content
        for escape in (f"file://{allowed}/../outside/secret.png", (allowed / "link.png").as_uri(), f"file://{allowed}/missing.png"):
            error = refused(lambda url=escape: ask(client, question("What color is the circle?", url)))
            assert error.status_code == 400 and error.body["code"] == "invalid_image", escape


def test_a_model_served_under_its_hub_id_is_found_by_it(engine):
    with running(create_app(engine, "liuhaotian/llava-v1.5-7b")) as base_url:  # the id's slash is part of the path
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
        assert client.models.retrieve("liuhaotian/llava-v1.5-7b").id == "liuhaotian/llava-v1.5-7b"
        assert refused(lambda: client.models.retrieve("liuhaotian")).status_code == 404


def test_an_api_key_is_required_and_never_echoed(engine):
    with running(create_app(engine, MODEL, api_key="s3cret-key")) as base_url:
        wrong = openai.OpenAI(base_url=base_url, api_key="guessed-key", max_retries=0, timeout=30)
        error = refused(lambda: wrong.models.list())
        assert error.status_code == 401 and "guessed-key" not in str(error.body) and "s3cret" not in str(error.body)
        assert error.response.headers["www-authenticate"] == "Bearer"
        right = openai.OpenAI(base_url=base_url, api_key="s3cret-key", max_retries=0, timeout=30)
        assert [model.id for model in right.models.list()] == [MODEL]
        assert refused(lambda: wrong.models.retrieve(MODEL)).status_code == 401
        assert httpx.get(base_url.removesuffix("/v1") + "/health").json() == {"status": "ok"}  # health needs no key
        assert httpx.get(base_url.removesuffix("/v1") + "/version").status_code == 200  # nor the version
        for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):  # vLLM's, outside /v1: a key too
            assert httpx.post(base_url.removesuffix("/v1") + path, json=body).status_code == 401
            assert httpx.post(base_url.removesuffix("/v1") + path, json=body,
                              headers={"authorization": "Bearer s3cret-key"}).status_code == 200
        lower = httpx.get(base_url + "/models", headers={"authorization": "bearer s3cret-key"})  # the scheme's case is free
        assert lower.status_code == 200
        assert httpx.get(base_url + "/models", headers={"authorization": "Basic s3cret-key"}).status_code == 401
    with running(create_app(engine, MODEL, api_key="s3cret-key\n")) as base_url:  # as read from a file
        assert httpx.get(base_url + "/models", headers={"authorization": "Bearer s3cret-key"}).status_code == 200
    for empty in ("", "  "):  # would let in "Authorization: Bearer " with nothing after it
        with pytest.raises(ValueError, match="empty"):
            create_app(engine, MODEL, api_key=empty)


def test_the_command_documents_itself_and_refuses_a_missing_media_folder(tmp_path):
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "engine.serve_cli", "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--allowed-local-media-path" in shown.stdout and "--allow-image-urls" in shown.stdout
    refused = subprocess.run([sys.executable, "-m", "engine.serve_cli", "--model", str(ROOT / "checkpoints" / MODEL),
                              "--allowed-local-media-path", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "is not a folder" in refused.stderr
    import os

    empty_key = subprocess.run([sys.executable, "-m", "engine.serve_cli", "--model", str(ROOT / "checkpoints" / MODEL)],
                               capture_output=True, text=True, timeout=120, env={**os.environ, "LLAVA_SERVE_API_KEY": ""})
    assert empty_key.returncode == 2 and "API key (--api-key or LLAVA_SERVE_API_KEY) is empty" in empty_key.stderr


def test_what_review_found_is_refused_cheaply(client):
    """From an attack on loopback: a seed past 64 bits was a 500 that reset the connection; 400,000 empty messages
    (a 25 MB body) took 45 s and 1.3 GB to template before the context check; an answer could run past the context."""
    import time

    error = refused(lambda: ask(client, CIRCLES, seed=2**64))
    assert error.status_code == 400 and error.body["param"] == "seed"
    assert ask(client, CIRCLES, max_tokens=3).choices[0].message.content is not None  # the connection still serves
    empty = [*CIRCLES, *[{"role": "assistant", "content": ""}, {"role": "user", "content": ""}] * 10_000]
    # the body is sent as it is: the openai client's own typing of 20,001 messages takes seconds of its own here
    body = json.dumps({"model": MODEL, "messages": empty, "max_tokens": 2})
    started = time.monotonic()
    response = httpx.post(f"{client.base_url}chat/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60)
    elapsed = time.monotonic() - started
    assert response.status_code == 400 and "20,001 messages" in response.json()["error"]["message"] and elapsed < 5
    long_text = question("q " * 492 + "Describe the image.", data_url(EXAMPLES / "three_shapes.png"))
    answer = ask(client, long_text, max_tokens=200, temperature=0)
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens <= 1024  # the model's context


def scrape(base_url: str) -> dict[str, float]:
    """/metrics read as Prometheus reads it: every sample line is `name value`, each name announced by its HELP and
    TYPE lines first."""
    response = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples, announced = {}, set()
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter") and (kind == "counter") == name.endswith("_total")
            announced.add(name)
        elif not line.startswith("#"):
            name, value = line.split()
            assert name in announced and name not in samples
            samples[name] = float(value)
    return samples


def test_metrics_count_what_the_answers_report():
    """A fresh engine (no other test's request in its counts): the counters grow by what the answers' usage says,
    and rows per decode step show that concurrent answers decoded together."""
    engine = ChatEngine(str(ROOT / "checkpoints" / MODEL), device="cpu")
    with running(create_app(engine, MODEL)) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        before = scrape(base_url)
        assert before["llava_requests_finished_total"] == 0 and before["llava_http_requests_active"] == 0
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda messages: ask(client, messages, max_tokens=24), conversations()[:4] * 2))
        answers.append(ask(client, CIRCLES, max_tokens=24))
        answers.append(ask(client, CIRCLES, max_tokens=24))  # the same prompt again: from the prefix cache
        after = scrape(base_url)
    usages = [answer.usage for answer in answers]
    assert after["llava_requests_finished_total"] == len(answers) and after["llava_requests_failed_total"] == 0
    assert after["llava_generation_tokens_total"] == sum(usage.completion_tokens for usage in usages)
    assert after["llava_prompt_tokens_total"] == sum(usage.prompt_tokens for usage in usages)
    cached = sum(usage.prompt_tokens_details.cached_tokens for usage in usages)
    assert after["llava_prompt_tokens_cached_total"] == cached and cached >= usages[-1].prompt_tokens - 1
    assert after["llava_requests_running"] == after["llava_requests_waiting"] == 0
    steps, rows = after["llava_decode_steps_total"], after["llava_decode_rows_total"]
    assert steps > 0 and rows / steps > 1.5  # four at a time decoded in one batch
    # every generated token but each answer's first (its prefill's, or the step that fed a rider) came from a step
    assert rows >= after["llava_generation_tokens_total"] - len(answers)
    assert after["llava_prefix_cache_entries"] > 0 and after["llava_scheduler_busy_seconds_total"] > 0


def test_an_answer_whose_scores_turn_to_nan_fails_alone(client, engine, monkeypatch):
    """A row whose logits become NaN (a float16 model overflowing) used to be decoded as noise, or, sampled, raised in
    the batched multinomial and failed every answer in the batch. Now that answer alone ends with a 500 that says
    why, its cache is not kept for later requests, and the others answer as they do alone."""
    requests = conversations()[:3]
    alone = [ask(client, messages).choices[0].message.content for messages in requests]
    batch, real_step = engine.scheduler._batch, engine.scheduler._batch.step
    poisoned = []

    def step():
        logits = real_step()
        for index, row in enumerate(batch.rows):
            if row.sampling.seed == 5 and len(row.tokens) >= 3:
                logits[index] = float("nan")
                poisoned.append(index)
        return logits

    monkeypatch.setattr(batch, "step", step)
    engine.scheduler.peak_batch = 0
    with ThreadPoolExecutor(4) as pool:  # the broken answer (3 tokens) in one batch with the others (40 each)
        broken = pool.submit(ask, client, CIRCLES, temperature=1.0, seed=5, max_tokens=30)
        others = [pool.submit(streamed, client, messages) for messages in requests]
        with pytest.raises(openai.InternalServerError) as refused:
            broken.result()
        assert [other.result()[0] for other in others] == alone
    assert poisoned and engine.scheduler.peak_batch > 1 and refused.value.code == "model_output_not_finite" and "NaN or infinite" in refused.value.message
    entries = list(engine.prefixes._entries.values())
    assert all(torch.isfinite(keys).all() and torch.isfinite(values).all() for entry in entries for keys, values in entry.layers)


def test_keep_alive_requests_do_not_wait_for_a_delayed_ack(client):
    """`running` serves with TCP_NODELAY: without it (a socket made with protocol 0, which asyncio does not take for
    TCP) the response's body waited for the client's delayed ACK of its headers, 40 ms a request on loopback."""
    with httpx.Client(base_url=str(client.base_url), timeout=30) as kept:
        kept.get("models").raise_for_status()
        start = time.perf_counter()
        for _ in range(10):
            kept.get("models").raise_for_status()
        assert time.perf_counter() - start < 0.3  # 10 x 40 ms at least with the delay; about 10 ms without
