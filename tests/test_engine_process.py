"""llava-serve's engine in a process of its own (engine/engine_process.py): it answers as the engine does in
process, alone and in a batch, streamed through the HTTP server; refusals keep their kind, a client that leaves
cancels its answer there, and a dead engine is reported instead of hanging every client."""

import base64
import json
import os
import signal
import subprocess
import threading
import time
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from engine import ChatEngine, ChatError
from engine.decoding import Sampling
from engine.engine_process import HEARTBEAT, EngineProcess, EngineStopped, compute_threads
from engine.server import create_app, running
from engine.prompts import StructureRefused
from engine.structured_output import Structure

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "checkpoints" / "shapes-llava"
IMAGES = sorted((ROOT / "examples").glob("*.png"))
QUESTIONS = ["What color is the circle?", "How many shapes are in the image?", "Describe the image."]
GREEDY = Sampling(temperature=0, max_new_tokens=40)


def conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}]


def api_messages(question: str, image: Path) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    return [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]}]


def last(progresses):
    for progress in progresses:
        pass
    return progress


@pytest.fixture(scope="module")
def child():
    engine = EngineProcess(str(MODEL), threads=1, device="cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def local():
    return ChatEngine(str(MODEL), device="cpu")


def test_answers_equal_the_engine_in_process_alone_and_at_once(child, local):
    cases = [(question, image.read_bytes()) for question in QUESTIONS for image in IMAGES]
    expected = [last(local.generate(conversation(question), image, GREEDY)).text for question, image in cases]
    alone = [last(child.generate(conversation(question), image, GREEDY)) for question, image in cases[:3]]
    assert [progress.text for progress in alone] == expected[:3]
    assert all(progress.finish_reason in ("stop", "length") and progress.completion_tokens > 0 for progress in alone)
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda case: last(child.generate(conversation(case[0]), case[1], GREEDY)).text, cases))
    assert together == expected
    text_only = [{"role": "user", "content": "What is a circle?"}]  # no image: the prompt carries none across
    assert last(child.generate(text_only, None, GREEDY)).text == last(local.generate(text_only, None, GREEDY)).text


def test_a_continued_message_stop_token_ids_and_token_ids_answer_as_in_process(child, local):
    """The Prompt crosses with what it continues (its text raw, as in process), and the sampling with its stop
    token ids and what it keeps of them."""
    image = IMAGES[0].read_bytes()
    messages = conversation("What color is the circle?") + [{"role": "assistant", "content": "The circle"}]
    prompting = {"rendering": {"add_generation_prompt": False, "continue_final_message": True}}
    mine = last(local.generate(messages, image, GREEDY, prompting=prompting))
    theirs = last(child.generate(messages, image, GREEDY, prompting=prompting))
    assert theirs.text == mine.text and theirs.text.startswith(" ")
    tokens = last(local.generate(conversation("Describe the image."), image, Sampling(temperature=0, max_new_tokens=40, logprobs=0))).tokens
    for keep in (False, True):
        sampling = Sampling(temperature=0, max_new_tokens=40, stop_token_ids=(tokens[3],), include_stop_str_in_output=keep)
        mine = last(local.generate(conversation("Describe the image."), image, sampling))
        theirs = last(child.generate(conversation("Describe the image."), image, sampling))
        assert (theirs.text, theirs.stop_reason, theirs.generated_tokens) == (mine.text, tokens[3], mine.generated_tokens)
        assert mine.generated_tokens == tokens.index(tokens[3]) + 1
    asking = Sampling(temperature=0, max_new_tokens=40, return_token_ids=True)  # the prompt's ids and the end token cross too
    mine, theirs = (last(engine.generate(conversation("Describe the image."), image, asking)) for engine in (local, child))
    assert theirs.prompt_ids == mine.prompt_ids and len(mine.prompt_ids) == mine.prompt_tokens
    assert theirs.end_token == mine.end_token == local.processor.tokenizer.eos_token_id


def test_stop_strings_are_cut_in_the_parent_as_the_engine_cuts_them(child, local):
    image = IMAGES[0].read_bytes()
    whole = last(local.generate(conversation("Describe the image."), image, GREEDY))
    words = whole.text.split()
    assert len(words) > 3, whole.text
    stop = (" " + words[2], "never in any answer")  # a word in the middle: the answer ends before it
    mine = list(local.generate(conversation("Describe the image."), image, GREEDY, stop=stop))
    theirs = list(child.generate(conversation("Describe the image."), image, GREEDY, stop=stop))
    assert (theirs[-1].text, theirs[-1].completion_tokens, theirs[-1].finish_reason) == \
        (mine[-1].text, mine[-1].completion_tokens, "stop")
    assert theirs[-1].text == whole.text[: whole.text.index(stop[0])].rstrip()
    assert theirs[-1].completion_tokens < whole.completion_tokens
    assert all(theirs[-1].text.startswith(progress.text) for progress in theirs)  # nothing shown is taken back
    assert last(child.generate(conversation("Describe the image."), image, GREEDY, stop=("",))).text == whole.text
    assert last(local.generate(conversation("Describe the image."), image, GREEDY, stop=("",))).text == whole.text


def test_refusals_keep_their_kind_and_a_closed_answer_is_cancelled(child):
    with pytest.raises(ChatError, match="image"):
        next(child.generate(conversation("What is it?"), b"\x89PNG\r\n\x1a\n not really", GREEDY))
    with pytest.raises(ValueError, match="session"):
        child.generate(conversation("What is it?"), IMAGES[0].read_bytes(), GREEDY, session_id="someone")
    long = child.generate(conversation("Describe the image in detail."), IMAGES[0].read_bytes(),
                          Sampling(temperature=0, max_new_tokens=4000))
    next(long)
    long.close()  # the child hears of it and stops that answer; the next one is answered as usual
    assert last(child.generate(conversation(QUESTIONS[0]), IMAGES[0].read_bytes(), GREEDY)).text


def test_a_structured_output_crosses_to_the_child_and_is_compiled_there(child, local):
    colors = Sampling(temperature=0, max_new_tokens=40, structure=Structure("choice", json.dumps(["red", "blue", "green"])))
    expected = last(local.generate(conversation(QUESTIONS[0]), IMAGES[0].read_bytes(), colors)).text
    assert expected in ("red", "blue", "green")
    assert last(child.generate(conversation(QUESTIONS[0]), IMAGES[0].read_bytes(), colors)).text == expected
    with pytest.raises(StructureRefused, match="parenthesis"):  # the child's refusal keeps its kind (the server checks first)
        next(child.generate(conversation(QUESTIONS[0]), IMAGES[0].read_bytes(),
                            Sampling(temperature=0, structure=Structure("regex", "(unclosed"))))


def test_an_answer_cancelled_while_it_waits_for_a_place_ends_without_its_prefill():
    engine = ChatEngine(str(MODEL), device="cpu", max_batch=1)
    stop_ids, engine.stop_ids = engine.stop_ids, set()  # the first answer holds the only place: it never ends early
    first = engine.generate_tokens(conversation("Describe the image."), IMAGES[0].read_bytes(),
                                   Sampling(temperature=0, max_new_tokens=3000))
    next(first)
    engine.stop_ids = stop_ids
    cancel, second = threading.Event(), []
    waiting = threading.Thread(target=lambda: second.extend(engine.generate_tokens(
        conversation(QUESTIONS[0]), IMAGES[1].read_bytes(), GREEDY, cancel=cancel)))
    waiting.start()
    deadline = time.monotonic() + 30
    while not engine.scheduler._waiting:  # it is queued behind the first
        assert time.monotonic() < deadline and waiting.is_alive()
        time.sleep(0.01)
    cancel.set()  # as the engine's process does when its client is gone
    waiting.join(5)
    assert not waiting.is_alive() and [arrived.new for arrived in second] == [[]]  # ended, with no token
    assert engine.scheduler.active == 1 and next(first).new  # while the first went on (it had 900-odd tokens to go)
    first.close()


def test_the_server_over_the_child_streams_as_it_answers_whole(child):
    with running(create_app(child, "shapes")) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        messages = api_messages(QUESTIONS[1], IMAGES[1])
        whole = client.chat.completions.create(model="shapes", messages=messages, temperature=0, max_tokens=40)
        chunks = client.chat.completions.create(model="shapes", messages=messages, temperature=0, max_tokens=40, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == whole.choices[0].message.content
        assert httpx.get(base_url.removesuffix("/v1") + "/health").status_code == 200


def test_a_text_completion_over_the_child_equals_the_engines_in_process(child, local):
    prompt = "A chat about a picture of shapes. USER: Describe the picture. ASSISTANT:"
    expected = last(local.complete(prompt, GREEDY))
    assert last(child.complete(prompt, GREEDY)).text == expected.text
    with pytest.raises(ChatError, match="image token"):  # refused in the parent, before the child hears of it
        child.complete("<image>", GREEDY)
    with running(create_app(child, "shapes")) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        whole = client.completions.create(model="shapes", prompt=prompt, temperature=0, max_tokens=40)
        chunks = client.completions.create(model="shapes", prompt=prompt, temperature=0, max_tokens=40, stream=True)
        assert whole.choices[0].text == "".join(chunk.choices[0].text for chunk in chunks) == expected.text
        assert expected.text.startswith(" ")  # a continuation's text, not a stripped answer
        # the sampling extras cross the pipe: min_tokens and a stop string held back until it, ignore_eos to max_tokens
        extras = Sampling(temperature=0, max_new_tokens=30, min_tokens=20)
        held = last(local.complete(prompt, extras, stop=(" square",)))
        assert held.completion_tokens >= 20 and last(child.complete(prompt, extras, stop=(" square",))).text == held.text
        through = client.completions.create(model="shapes", prompt=prompt, temperature=0, max_tokens=25, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        assert [chunk.usage.completion_tokens for chunk in through if chunk.usage] == [25]
        several = client.completions.create(model="shapes", prompt=[prompt, prompt + " The"], temperature=0, max_tokens=40)
        assert several.choices[0].text == expected.text
        assert several.choices[1].text == last(local.complete(prompt + " The", GREEDY)).text
        # the score rules cross the pipe: the child's sequences apply them as the engine in process does
        ruled = Sampling(temperature=0, max_new_tokens=30, repetition_penalty=1.3, frequency_penalty=0.5, logit_bias=((17, 3.0),))
        assert last(child.complete(prompt, ruled)).text == last(local.complete(prompt, ruled)).text != expected.text
        # log-probabilities cross the pipe: the prompt's (echo) and the answer's, with the end token's, as in process
        scoring = Sampling(temperature=0, max_new_tokens=40, logprobs=2, prompt_logprobs=2)
        mine, theirs = last(local.complete(prompt, scoring)), last(child.complete(prompt, scoring))
        def close(found, expected):  # the child runs its operators on one thread: sums in another order
            return [(each.token, [token for token, _ in each.top]) for each in found] == \
                [(each.token, [token for token, _ in each.top]) for each in expected] and \
                all(abs(mine.logprob - theirs.logprob) < 1e-4 for mine, theirs in zip(found, expected))

        assert theirs.prompt_logprobs[0] is None and close(theirs.prompt_logprobs[1:], mine.prompt_logprobs[1:])
        assert len(mine.prompt_logprobs) == mine.prompt_tokens
        assert close(theirs.logprobs, mine.logprobs) and len(mine.logprobs) == mine.completion_tokens
        assert close([theirs.ended_by], [mine.ended_by]) and mine.ended_by.token in local.stop_ids
        scored = client.completions.create(model="shapes", prompt=[prompt, prompt + " The"], temperature=0, max_tokens=1, logprobs=1,
                                           echo=True)
        assert [len(choice.logprobs.token_logprobs) for choice in scored.choices] == [mine.prompt_tokens + 1, mine.prompt_tokens + 2]
        assert scored.choices[0].logprobs.token_logprobs[1:-1] == [found.logprob for found in theirs.prompt_logprobs[1:]]


def test_the_server_reads_the_child_on_its_event_loop_and_cancels_what_it_stops_reading(child, local, monkeypatch):
    """Over the child, a stream's chunks reach the event loop with no worker thread of their own (one hop, to start
    the answer, however many chunks), and equal the engine's answer in process; a stop string cut in the parent
    cancels the rest of the answer in the child, and so does a client that leaves mid-stream."""
    import engine.server as server

    hops, sent = [], []
    real_hop, real_send = server.run_in_threadpool, child._send

    async def counted(function, *args, **kwargs):
        hops.append(getattr(function, "__name__", function))
        return await real_hop(function, *args, **kwargs)

    monkeypatch.setattr(server, "run_in_threadpool", counted)
    monkeypatch.setattr(child, "_send", lambda message: (sent.append(message[:2]), real_send(message))[1])
    image = IMAGES[2]
    expected = last(local.generate(conversation(QUESTIONS[2]), image.read_bytes(), GREEDY))
    with running(create_app(child, "shapes", stream_interval=0)) as base_url:  # a chunk per token
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        chunks = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="shapes", messages=api_messages(QUESTIONS[2], image), temperature=0, max_tokens=40, stream=True) if chunk.choices]
        assert "".join(chunks) == expected.text and len(chunks) > 5
        assert hops == ["started"] and [kind for kind, _ in sent] == ["generate"]

        # a long answer (114 tokens) streamed a chunk per token, cut at its third word: the child is still answering
        # when the parent sees it
        # (a short one may reach the parent whole, with its finish reason, in one message: nothing to cancel)
        detailed = last(local.generate(conversation("Describe the image in detail."), IMAGES[1].read_bytes(),
                                       Sampling(temperature=0, max_new_tokens=200))).text
        words = detailed.split()
        stopped = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="shapes", messages=api_messages("Describe the image in detail.", IMAGES[1]), temperature=0, max_tokens=200,
            stop=[" " + words[2]], stream=True) if chunk.choices)
        assert stopped == detailed[: detailed.index(" " + words[2])].rstrip()
        deadline = time.monotonic() + 10
        while len(sent) < 3:  # the stream's release sends it, after [DONE]
            assert time.monotonic() < deadline, sent
            time.sleep(0.05)
        assert [kind for kind, _ in sent[1:]] == ["generate", "cancel"] and sent[1][1] == sent[2][1]

        # an answer of 114 tokens (one chunk each): the client is gone after the first
        body = {"model": "shapes", "messages": api_messages("Describe the image in detail.", IMAGES[1]), "stream": True,
                "max_tokens": 2000, "temperature": 0}
        del sent[:]
        with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == ""
        deadline = time.monotonic() + 20
        while len(sent) < 2:  # the server notices at its next chunk, and cancels the answer in the child
            assert time.monotonic() < deadline, sent
            time.sleep(0.05)
        assert [kind for kind, _ in sent] == ["generate", "cancel"] and sent[0][1] == sent[1][1]
        deadline = time.monotonic() + 10
        while child._streams:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_the_engines_counts_reach_metrics_with_its_heartbeat(child):
    """The child's counts come with its heartbeat (once a second), so /metrics never waits for the child: after an
    answer, within a beat or two, they include it, and say how old they are."""
    def next_beat() -> dict:  # the figures of a beat sent after this call
        asked, deadline = time.monotonic(), time.monotonic() + 30
        while (stats := child.stats()).get("running") is None or time.monotonic() - stats["stats_age_seconds"] <= asked:
            assert time.monotonic() < deadline, "no heartbeat brought the engine's figures"
            time.sleep(0.05)
        return stats

    before = next_beat()
    answer = last(child.generate(conversation(QUESTIONS[1]), IMAGES[1].read_bytes(), GREEDY))
    after = next_beat()
    if after["requests_finished"] == before["requests_finished"]:  # the child counts it once its answer's last message is sent
        after = next_beat()
    assert after["requests_finished"] - before["requests_finished"] == 1 and after["running"] == 0
    assert after["prompt_tokens"] - before["prompt_tokens"] == answer.prompt_tokens
    assert after["generation_tokens"] - before["generation_tokens"] == answer.generated_tokens
    assert after["stats_age_seconds"] < 2 * HEARTBEAT
    with running(create_app(child, "shapes")) as base_url:
        text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    assert f"llava_requests_finished_total {after['requests_finished']}\n" in text and "llava_engine_stats_age_seconds " in text


def test_a_stopped_engine_fails_the_health_check_until_it_goes_on(child, monkeypatch):
    monkeypatch.setattr(child, "silence_limit", 1.5)
    with running(create_app(child, "shapes")) as base_url:
        health = base_url.removesuffix("/v1") + "/health"
        assert httpx.get(health, timeout=10).status_code == 200
        os.kill(child._process.pid, signal.SIGSTOP)  # alive, answering nothing (as a frozen or swapped-out process)
        try:
            # a request whose image fills the pipe's buffer: its send blocks, and must not block the health check
            outcome = []
            blocked = threading.Thread(target=_refused, args=(child, outcome), daemon=True)
            blocked.start()
            time.sleep(2.0)
            started = time.monotonic()
            stopped = httpx.get(health, timeout=10)
            waited = time.monotonic() - started
            # a new request is turned away at once rather than left waiting for an engine that may never answer
            turned_away = httpx.post(f"{base_url}/completions", json={"model": "shapes", "prompt": "Hi"}, timeout=10)
        finally:
            os.kill(child._process.pid, signal.SIGCONT)
        assert (stopped.status_code, stopped.json()) == (503, {"status": "engine not responding"}) and waited < 1.0
        assert turned_away.status_code == 503 and turned_away.json()["error"]["code"] == "engine_not_responding"
        assert turned_away.headers["retry-after"] == "1"
        blocked.join(30)
        assert not blocked.is_alive() and outcome == [ChatError]
        deadline = time.monotonic() + 10
        while httpx.get(health, timeout=10).status_code != 200:  # its next heartbeat
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert last(child.generate(conversation(QUESTIONS[0]), IMAGES[0].read_bytes(), GREEDY)).text


def _refused(engine, outcome: list):
    try:
        last(engine.generate(conversation("What?"), os.urandom(3_000_000), GREEDY))
    except Exception as error:
        outcome.append(type(error))


def test_a_client_gone_before_its_first_token_is_let_go_at_once(child, monkeypatch):
    """A client that leaves while its answer has not started (here the engine's process is frozen): the server
    notices the disconnect itself, cancels the answer in the child and frees the place, without waiting for a token."""
    sent, real_send = [], child._send
    monkeypatch.setattr(child, "_send", lambda message: (sent.append(message[:2]), real_send(message))[1])
    with running(create_app(child, "shapes", max_concurrent=1)) as base_url:
        os.kill(child._process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up before the first token
                httpx.post(base_url + "/chat/completions", json={"model": "shapes", "stream": True,
                           "messages": api_messages(QUESTIONS[0], IMAGES[0])}, timeout=1.0)
            deadline = time.monotonic() + 10
            while len(sent) < 2 or child._streams:
                assert time.monotonic() < deadline, (sent, child._streams)
                time.sleep(0.05)
            assert [kind for kind, _ in sent] == ["generate", "cancel"] and sent[0][1] == sent[1][1]
        finally:
            os.kill(child._process.pid, signal.SIGCONT)
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        assert client.chat.completions.create(model="shapes", messages=api_messages(QUESTIONS[0], IMAGES[0]), temperature=0,
                                              max_tokens=10).choices[0].message.content  # the only place is free


def test_a_stream_of_several_choices_over_the_child_interleaves_and_is_let_go_whole(child, local):
    prompt = "A chat about a picture of shapes. USER: Describe the picture. ASSISTANT:"
    expected = [last(local.complete(prompt + tail, GREEDY)).text for tail in ("", " The")]
    sent, real_send = [], child._send
    with running(create_app(child, "shapes", stream_interval=0)) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
        chunks = [chunk.choices[0] for chunk in client.completions.create(
            model="shapes", prompt=[prompt, prompt + " The"], temperature=0, max_tokens=40, stream=True) if chunk.choices]
        assert ["".join(chunk.text for chunk in chunks if chunk.index == index) for index in (0, 1)] == expected
        # four long answers, the client gone after the first chunk: each is cancelled in the child
        child._send = lambda message: (sent.append(message[:2]), real_send(message))[1]
        body = {"model": "shapes", "messages": api_messages(QUESTIONS[0], IMAGES[0]), "n": 4, "stream": True,
                "max_tokens": 1000, "temperature": 1.0, "ignore_eos": True}
        try:
            with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=30) as response:
                assert next(line for line in response.iter_lines() if line.startswith("data: "))
            deadline = time.monotonic() + 10
            while sorted(kind for kind, _ in sent) != ["cancel"] * 4 + ["generate"] * 4 or child._streams:
                assert time.monotonic() < deadline, (sent, child._streams)
                time.sleep(0.05)
        finally:
            child._send = real_send


def test_a_dead_engine_fails_its_answers_and_the_health_check():
    engine = EngineProcess(str(MODEL), threads=1, device="cpu")
    with running(create_app(engine, "shapes")) as base_url:
        body = {"model": "shapes", "messages": api_messages("Describe the image in detail.", IMAGES[1]), "stream": True,
                "max_tokens": 2000, "temperature": 0}
        with httpx.stream("POST", base_url + "/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            engine._process.kill()  # mid-stream: the stream ends with an error event, then [DONE]
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and "stopped" in rest[-2] and '"error"' in rest[-2], rest[-3:]
        assert engine._streams == {}
    engine = EngineProcess(str(MODEL), threads=1, device="cpu")
    with running(create_app(engine, "shapes")) as base_url:
        answer = engine.generate(conversation("Describe the image in detail."), IMAGES[0].read_bytes(), Sampling(temperature=0, max_new_tokens=4000))
        next(answer)
        engine._process.kill()  # as the kernel's OOM killer would
        with pytest.raises(EngineStopped, match="stopped"):
            last(answer)
        assert not engine.alive
        assert httpx.get(base_url.removesuffix("/v1") + "/health").status_code == 503
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
        with pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="shapes", messages=api_messages(QUESTIONS[0], IMAGES[0]))
        assert refused.value.status_code == 503 and "stopped" in refused.value.message
    with pytest.raises(EngineStopped):
        next(engine.generate(conversation("What?"), IMAGES[0].read_bytes(), GREEDY))


def test_a_model_that_does_not_load_is_named(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(EngineStopped, match="could not load"):
        EngineProcess(str(missing), threads=1, device="cpu")
    # llava-serve: exit 1 and one line that names the path, no traceback (the child's or the parent's)
    done = subprocess.run([sys.executable, "-m", "engine.serve_cli", "--model", str(missing), "--port", "0"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == [f"llava-serve: the engine could not load {missing}: ValueError: "
                                                f"{missing}: no such folder (and not a hub id, which reads NAME or "
                                                "OWNER/NAME)"], done.stderr


def test_threads_leave_a_core_to_the_web_process(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert compute_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    assert compute_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert compute_threads() == 5
    for unusable in ("", "0", "four", "4,2"):  # OpenMP's nested-list form too: not one count
        monkeypatch.setenv("OMP_NUM_THREADS", unusable)
        assert compute_threads() == max(1, len(os.sched_getaffinity(0)) - 1), unusable
