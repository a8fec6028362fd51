"""llava-serve's `n`: several choices for one prompt (or each of a completion's prompts), each an answer of its own
decoded with the others, choice j drawing with the request's seed + j; whole and streamed, through the openai
client on loopback."""

import httpx

from test_serve import CIRCLES, MODEL, client, engine, refused  # noqa: F401
from test_serve_completions import PROMPT, complete

SAMPLED = {"temperature": 1.5, "max_tokens": 24}


def test_n_chat_choices_are_each_the_answer_of_their_own_seed(client):
    together = client.chat.completions.create(model=MODEL, messages=CIRCLES, n=3, seed=11, **SAMPLED)
    assert [choice.index for choice in together.choices] == [0, 1, 2]
    alone = [client.chat.completions.create(model=MODEL, messages=CIRCLES, seed=11 + choice, **SAMPLED) for choice in range(3)]
    assert [choice.message.content for choice in together.choices] == [answer.choices[0].message.content for answer in alone]
    assert len({choice.message.content for choice in together.choices}) > 1  # three draws, not one thrice
    # the prompt counted once, as OpenAI's and vLLM's
    assert together.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert together.usage.completion_tokens == sum(answer.usage.completion_tokens for answer in alone)
    # streamed: each choice's role, then its text, its chunks naming it
    chunks = list(client.chat.completions.create(model=MODEL, messages=CIRCLES, n=3, seed=11, stream=True,
                                                 stream_options={"include_usage": True}, **SAMPLED))
    for index, choice in enumerate(together.choices):
        mine = [chunk.choices[0] for chunk in chunks if chunk.choices and chunk.choices[0].index == index]
        assert mine[0].delta.role == "assistant"
        assert "".join(part.delta.content or "" for part in mine) == choice.message.content
        assert [part.finish_reason for part in mine if part.finish_reason] == [choice.finish_reason]
    usage = chunks[-1].usage  # (its cached tokens are the prefix cache's: the prompt was asked before)
    assert (usage.prompt_tokens, usage.completion_tokens) == (together.usage.prompt_tokens, together.usage.completion_tokens)
    greedy = client.chat.completions.create(model=MODEL, messages=CIRCLES, n=2, temperature=0, max_tokens=24)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_n_completions_of_several_prompts_are_in_prompt_order_then_choice(client):
    prompts = [PROMPT, "A picture of shapes. USER: What color is the circle? ASSISTANT:"]
    together = complete(client, prompts, n=2, seed=5, **SAMPLED)
    expected = [complete(client, prompt, seed=5 + choice, **SAMPLED).choices[0].text for prompt in prompts for choice in range(2)]
    assert [choice.index for choice in together.choices] == [0, 1, 2, 3]
    assert [choice.text for choice in together.choices] == expected
    assert together.usage.prompt_tokens == sum(complete(client, prompt, max_tokens=1).usage.prompt_tokens for prompt in prompts)
    # with echo and log-probabilities, each choice its own
    scored = complete(client, prompts, n=2, max_tokens=2, logprobs=1, echo=True, seed=5, temperature=1.5)
    for index, choice in enumerate(scored.choices):
        assert choice.text.startswith(prompts[index // 2]) and choice.logprobs.token_logprobs[0] is None


def test_too_many_choices_are_refused_by_name(client):
    base = str(client.base_url).rstrip("/")
    for path, body in [("chat/completions", {"messages": CIRCLES, "n": 65}),
                       ("completions", {"prompt": [PROMPT] * 8, "n": 9}),
                       ("completions", {"prompt": PROMPT, "n": 0})]:
        response = httpx.post(f"{base}/{path}", json={"model": MODEL, **body}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == "n", response.text


def test_a_client_that_leaves_a_stream_of_several_choices_lets_go_of_them_all(client, engine):
    import time

    body = {"model": MODEL, "messages": CIRCLES, "n": 4, "stream": True, "max_tokens": 1000, "temperature": 1.0,
            "ignore_eos": True}  # four answers of about a thousand tokens each: seconds on this CPU, if kept
    with httpx.stream("POST", f"{str(client.base_url).rstrip('/')}/chat/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        deadline = time.monotonic() + 5  # the stream began with the first choice's first token; the others join it
        while engine.scheduler.active < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.scheduler.active == 4
    deadline = time.monotonic() + 5
    while engine.scheduler.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.active == 0


def test_with_one_place_a_streams_first_byte_waits_for_its_first_choice_only_and_a_leaver_is_let_go():
    """max_batch 1: a stream of two long choices begins with the first one's tokens (the second waits for the place);
    a whole answer whose client leaves while it waits for the place is cancelled at once, in this process too."""
    import threading
    import time
    from pathlib import Path

    from engine import ChatEngine
    from engine.server import create_app, running

    engine = ChatEngine(str(Path(__file__).resolve().parents[1] / "checkpoints" / MODEL), device="cpu", max_batch=1)
    forward = engine.model.forward

    def slowed(*args, **kwargs):  # 2 ms a forward: the answers below last seconds on any machine
        time.sleep(0.002)
        return forward(*args, **kwargs)

    engine.model.forward = slowed
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 600, "temperature": 0, "ignore_eos": True}
    with running(create_app(engine, MODEL)) as base_url:
        start = time.monotonic()
        with httpx.stream("POST", base_url + "/completions", json={**long, "n": 2, "stream": True}, timeout=60) as response:
            assert next(line for line in response.iter_lines() if line.startswith("data: "))
            first_byte = time.monotonic() - start
            assert engine.scheduler.active == 1  # the first choice decoding, the second waiting for the place
        alone = time.monotonic()
        httpx.post(base_url + "/completions", json={**long, "max_tokens": 300}, timeout=60)
        whole_answer = time.monotonic() - alone
        assert first_byte < whole_answer / 2, (first_byte, whole_answer)
        deadline = time.monotonic() + 10
        while engine.scheduler.active and time.monotonic() < deadline:
            time.sleep(0.02)
        # one long answer (about 3 s) holds the place; a second request's client gives up while it waits
        holder = threading.Thread(target=lambda: httpx.post(base_url + "/completions", json={**long, "max_tokens": 990}, timeout=60))
        holder.start()
        deadline = time.monotonic() + 10
        while engine.scheduler.active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            httpx.post(base_url + "/completions", json=long, timeout=0.5)
        except httpx.ReadTimeout:
            pass
        deadline = time.monotonic() + 0.5  # (without the cancel it waited for the holder's end, seconds)
        while engine.scheduler.stats()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.scheduler.stats()["waiting"] == 0 and holder.is_alive()  # let go of before the holder is done
        holder.join(60)


def test_a_field_that_asked_for_too_much_is_the_one_named(client):
    base = str(client.base_url).rstrip("/")
    too_long = httpx.post(f"{base}/chat/completions", json={"model": MODEL, "n": 2, "messages": [
        {"role": "user", "content": "shape " * 1200}]}, timeout=30)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "messages", too_long.text


def test_a_choice_that_fails_mid_stream_is_named_and_the_stream_ends(client, engine):
    """Choice 1's scores turn NaN (a hook poisons the second row of each two-row step): the stream ends with one
    error event naming that choice, then [DONE], and nothing is left decoding."""
    import json
    import time

    def poisoned(module, args, kwargs, output):
        if output.logits.shape[0] == 2:  # a decode step of both choices
            output.logits[1] = float("nan")
        return output

    hook = engine.model.register_forward_hook(poisoned, with_kwargs=True)
    try:
        body = {"model": MODEL, "messages": CIRCLES, "n": 2, "stream": True, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
        with httpx.stream("POST", f"{str(client.base_url).rstrip('/')}/chat/completions", json=body, timeout=30) as response:
            events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    finally:
        hook.remove()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "model_output_not_finite" and error["message"].startswith("choice 1: "), error
    deadline = time.monotonic() + 5
    while engine.scheduler.active and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.scheduler.active == 0


def test_continuous_usage_stats_give_every_chunk_its_choices_usage_so_far(client):
    """vLLM's stream_options.continuous_usage_stats: with include_usage, each chunk's usage is its choice's so far,
    growing to the whole answer's; the last chunk the request's."""
    chunks = list(client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=20, n=2, stream=True,
                                                 stream_options={"include_usage": True, "continuous_usage_stats": True}))
    for index in (0, 1):
        mine = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].index == index]
        counts = [chunk.usage.completion_tokens for chunk in mine]
        assert all(chunk.usage is not None for chunk in mine) and counts == sorted(counts) and counts[-1] > 0
        assert mine[-1].usage.prompt_tokens == chunks[-1].usage.prompt_tokens  # a prompt counted once in the request's
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == sum(
        [chunk.usage.completion_tokens for chunk in chunks if chunk.choices and chunk.choices[0].index == index][-1] for index in (0, 1))
    plain = list(client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=5, stream=True,
                                                stream_options={"include_usage": True}))
    assert all(chunk.usage is None for chunk in plain[:-1])  # without it, only the last chunk has a usage
