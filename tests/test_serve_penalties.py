"""llava-serve's logit_bias and penalties (OpenAI's frequency_penalty and presence_penalty, vLLM's
repetition_penalty), checked against transformers' generate and a plain greedy loop over the whole text; each
request's rules stay its own in a batch."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from engine.decoding import Sampling
from test_serve import MODEL, client, engine, refused  # noqa: F401
from test_serve_completions import PROMPT, complete


def ids_of(answer) -> list[int]:
    return [int(name.removeprefix("token_id:")) for name in answer.choices[0].logprobs.tokens]


def exact(client, prompt, **options):
    """A greedy completion with its tokens by id (and the end token, if one ended it, last)."""
    extra = {"return_tokens_as_token_ids": True, **options.pop("extra_body", {})}
    return complete(client, prompt, logprobs=0, extra_body=extra, **options)


def greedy_with(engine, ids: list[int], count: int, frequency=0.0, presence=0.0) -> list[int]:
    """Greedy tokens after `ids`, one forward per token over the whole text, OpenAI's penalties applied by hand."""
    ids, said = list(ids), []
    with torch.no_grad():
        for _ in range(count):
            scores = engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(said, dtype=torch.long), minlength=scores.shape[0]).float() if said else torch.zeros_like(scores)
            token = int((scores - frequency * counts - presence * (counts > 0)).argmax())
            ids.append(token)
            said.append(token)
            if token in engine.stop_ids:
                break
    return said


def test_repetition_penalty_equals_transformers_generate(client, engine):
    ids = engine.processor.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        generated = engine.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.3)
    expected = generated[0, len(ids):].tolist()
    plain = ids_of(exact(client, PROMPT, max_tokens=24))
    penalized = ids_of(exact(client, PROMPT, max_tokens=24, extra_body={"repetition_penalty": 1.3}))
    assert penalized == expected[: len(penalized)] and len(penalized) >= len(expected) - 1  # (generate keeps its end token)
    assert penalized != plain


def test_frequency_and_presence_penalties_equal_the_greedy_loop_that_applies_them(client, engine):
    ids = engine.processor.tokenizer(PROMPT)["input_ids"]
    for frequency, presence in [(1.5, 0.0), (0.0, 2.0), (0.7, 0.7), (-1.0, 0.0)]:
        expected = greedy_with(engine, ids, 24, frequency, presence)
        answer = ids_of(exact(client, PROMPT, max_tokens=24, frequency_penalty=frequency, presence_penalty=presence))
        assert answer == expected, (frequency, presence)
    assert greedy_with(engine, ids, 24, 1.5) != greedy_with(engine, ids, 24)  # the penalty changes this answer


def test_logit_bias_forces_and_rules_out_tokens(client, engine):
    first = ids_of(exact(client, PROMPT, max_tokens=3))
    forced = ids_of(exact(client, PROMPT, max_tokens=4, logit_bias={"17": 100}))
    assert forced == [17] * 4
    sampled = complete(client, PROMPT, max_tokens=4, temperature=1.5, seed=3, logit_bias={"17": 100}, logprobs=0,
                       extra_body={"return_tokens_as_token_ids": True})
    assert ids_of(sampled) == [17] * 4
    ruled_out = ids_of(exact(client, PROMPT, max_tokens=3, logit_bias={str(first[0]): -100}))
    with torch.no_grad():
        scores = engine.model(input_ids=torch.tensor([engine.processor.tokenizer(PROMPT)["input_ids"]])).logits[0, -1]
    assert ruled_out[0] != first[0] and ruled_out[0] == int(scores.topk(2).indices[1])


def test_one_requests_rules_do_not_reach_the_others_in_its_batch(client, engine):
    plain = exact(client, PROMPT, max_tokens=24).choices[0].text
    engine.scheduler.peak_batch = 0
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda bias: exact(client, PROMPT, max_tokens=24, **bias).choices[0].text,
                                [{}, {"logit_bias": {"17": 100}}, {}, {"frequency_penalty": 2.0}]))
    assert answers[0] == answers[2] == plain and answers[1] != plain
    assert engine.scheduler.peak_batch > 1  # they did share a batch


def test_rules_out_of_range_are_refused_by_name(client):
    base = str(client.base_url).rstrip("/")
    for body, param in [({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"100000": 1}}, "logit_bias"),
                        ({"logit_bias": {"5": 101}}, "logit_bias"), ({"logit_bias": {"-5": 1}}, "logit_bias"),
                        ({"frequency_penalty": 2.5}, "frequency_penalty"), ({"presence_penalty": -3}, "presence_penalty"),
                        ({"repetition_penalty": 0}, "repetition_penalty"), ({"repetition_penalty": 11}, "repetition_penalty")]:
        response = httpx.post(f"{base}/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **body}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (body, response.text)
    # neutral values pass, as clients send them by habit
    assert complete(client, PROMPT, max_tokens=2, frequency_penalty=0, presence_penalty=0, logit_bias={}).choices[0].text


def test_sampling_refuses_rules_out_of_range():
    import pytest

    for rules in ({"frequency_penalty": 3}, {"repetition_penalty": 0}, {"logit_bias": ((5, 200.0),)}):
        with pytest.raises(ValueError):
            Sampling(**rules)


def test_a_rule_that_makes_a_score_infinite_ends_its_own_row_only():
    """A repetition penalty divides a seen token's positive score: over float32's range it is +inf, and softmax of
    that row NaN, whose multinomial would raise for the whole batch. The row is caught after its rules."""
    from engine.decoding import next_tokens
    from engine.penalties import Penalties

    logits = torch.randn(3, 50)
    logits[0, 5] = 3e38
    ruled = Sampling(temperature=1.0, repetition_penalty=0.01)
    tokens = next_tokens(logits, [ruled, Sampling(temperature=1.0), Sampling(temperature=0.0)], [None] * 3, [],
                         penalties=[Penalties(ruled, [5]), None, None])
    assert tokens[0] is None and isinstance(tokens[1], int) and tokens[2] == int(logits[2].argmax())


def test_loose_types_are_refused(client):
    base = str(client.base_url).rstrip("/")
    for body, param in [({"logit_bias": {"5": True}}, "logit_bias.5"), ({"logit_bias": {"5": "50"}}, "logit_bias.5"),
                        ({"n": True}, "n"), ({"seed": 1.0}, "seed"), ({"n": 2, "best_of": 3}, "best_of")]:
        response = httpx.post(f"{base}/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **body}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"].startswith(param.split(".")[0]), (body, response.text)
    assert len(complete(client, PROMPT, max_tokens=2, n=2, extra_body={"best_of": 2}).choices) == 2
    # "5" and "0005" are one token: one bias, the later
    assert ids_of(exact(client, PROMPT, max_tokens=3, logit_bias={"17": -100, "0017": 100})) == [17] * 3
