"""vLLM's and SGLang's sampling extras through llava-serve: top_k and min_p (the candidates cut as transformers'
warpers cut them), min_tokens (as transformers' min_new_tokens) and ignore_eos (SGLang's benchmark sends it with
every request), over loopback with the official openai client and with a benchmark's raw payload."""

import json

import httpx
import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from engine.answer_text import AnswerText, Tokens
from engine.decoding import Sampling, truncated
from test_serve import CIRCLES, MODEL, ask, client, engine, refused  # noqa: F401
from test_serve_completions import PROMPT, complete


def greedy_through_end_tokens(engine, ids: list[int], count: int) -> list[int]:
    """The model's greedy next `count` tokens after `ids`, end tokens included, one uncached forward per token."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-count:]


@pytest.mark.parametrize("seed", range(6))
def test_the_candidates_left_are_those_transformers_warpers_leave(seed):
    """min_p and top_k, then top_p over what they left: vLLM's order (its min_p is a logits processor that runs
    before its top-k/top-p sampler), built from transformers' warpers in that order. (transformers' own generate
    runs min_p after top_p, which keeps more when both cut.)"""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 50, generator=generator, dtype=torch.float64) * 3
    top_k = torch.tensor([0, 5, 12, 1])
    top_p = torch.tensor([0.9, 0.5, 0.95, 1.0], dtype=torch.float64)
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.0], dtype=torch.float64)
    kept = truncated(torch.softmax(logits, dim=-1), top_p, top_k, min_p) > 0
    for row in range(4):
        scores = logits[row : row + 1].clone()
        if min_p[row]:
            scores = MinPLogitsWarper(float(min_p[row]))(None, scores)
        if top_k[row]:
            scores = TopKLogitsWarper(int(top_k[row]))(None, scores)
        scores = TopPLogitsWarper(float(top_p[row]))(None, scores)
        assert torch.equal(kept[row], torch.isfinite(scores[0])), row
    assert kept[3].sum() == 1 and kept[1].sum() <= 5 and kept[2].sum() < 12


def test_top_k_1_and_min_p_1_sample_the_greedy_answer(client):
    greedy = complete(client, PROMPT, max_tokens=24).choices[0].text
    hot = {"temperature": 2.0, "max_tokens": 24}
    seeds = [seed for seed in range(8) if complete(client, PROMPT, seed=seed, **hot).choices[0].text != greedy]
    assert len(seeds) >= 4  # at this temperature sampling leaves the greedy answer ...
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        for seed in seeds[:3]:  # ... but not with one candidate left
            assert complete(client, PROMPT, seed=seed, extra_body=extra, **hot).choices[0].text == greedy, extra
    # a cut that leaves several: a seeded answer is the same every time
    again = [complete(client, PROMPT, seed=seeds[0], extra_body={"top_k": 5, "min_p": 0.01}, **hot).choices[0].text for _ in range(2)]
    assert again[0] == again[1]


def test_min_tokens_decodes_past_the_end_token_as_transformers_min_new_tokens(client, engine):
    tokenizer = engine.processor.tokenizer
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    natural = complete(client, PROMPT, max_tokens=40)
    assert natural.choices[0].finish_reason == "stop" and natural.usage.completion_tokens < 20
    expected = engine.model.generate(input_ids=ids, max_new_tokens=40, min_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
    longer = complete(client, PROMPT, max_tokens=40, extra_body={"min_tokens": 20})
    assert longer.usage.completion_tokens >= 20
    assert longer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert longer.choices[0].text.startswith(natural.choices[0].text)
    # streamed, the same
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=40, stream=True,
                                       extra_body={"min_tokens": 20})
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == longer.choices[0].text


def test_a_stop_string_counts_only_past_the_first_min_tokens_tokens(client):
    """As vLLM: stop strings are looked for once an answer has min_tokens tokens."""
    natural = ask(client, CIRCLES).choices[0].message.content  # "The circle is red."
    early = natural.split()[1]  # in the first tokens' text
    assert ask(client, CIRCLES, stop=[early]).choices[0].finish_reason == "stop"
    held = ask(client, CIRCLES, stop=[early], max_tokens=12, extra_body={"min_tokens": 8})
    assert held.usage.completion_tokens >= 8 and held.choices[0].message.content.startswith(natural.rstrip("."))


def test_a_stop_string_ending_past_the_floor_cuts_the_text():
    class Letters:  # a token per character: ids are code points
        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    def fed(text, stop, min_tokens):
        answer = AnswerText(Letters(), stop, context=[], sampling=Sampling(max_new_tokens=16, min_tokens=min_tokens))
        progress = answer.add(Tokens([ord(c) for c in text], 1, 0))
        return progress.text, progress.finish_reason

    assert fed("ab|cd|ef", ("|",), 0) == ("ab", "stop")
    assert fed("ab|cd|ef", ("|",), 3) == ("ab|cd", "stop")  # the first "|" is within the first 3 tokens
    assert fed("ab|cd|ef", ("|c",), 3) == ("ab", "stop")  # this one ends past them
    assert fed("ab|cd|ef", ("|",), 8) == ("ab|cd|ef", None)


def test_ignore_eos_decodes_max_tokens_through_end_tokens(client, engine):
    tokenizer = engine.processor.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    expected = greedy_through_end_tokens(engine, ids, 24)
    assert set(expected) & engine.stop_ids  # the model's answer ends within them
    answer = complete(client, PROMPT, max_tokens=24, extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 24 and answer.choices[0].finish_reason == "length"
    assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    chat = ask(client, CIRCLES, max_tokens=30, extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 30 and chat.choices[0].finish_reason == "length"


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Describe a red circle."}]}),
])
def test_sglang_bench_servings_payload_gets_answers_of_the_length_it_asked(client, path, body):
    """SGLang's bench_serving sends ignore_eos: true and best_of: 1 by default, streamed with usage."""
    payload = {"model": MODEL, **body, "temperature": 0.0, "best_of": 1, "max_tokens": 17, "stream": True,
               "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", str(client.base_url) + path.removeprefix("/v1/"), json=payload, timeout=60) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 17


@pytest.mark.parametrize("extra, param", [
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2**70, "temperature": 1.0}, "top_k"),  # past int64: the batch's sampling tensor would overflow
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": -1.2}, "repetition_penalty"),
])
def test_out_of_range_extras_are_refused_by_name(client, extra, param):
    error = refused(lambda: complete(client, PROMPT, extra_body=extra))
    assert error.status_code == 400 and error.body["param"] == param, error.body


def test_min_tokens_near_the_end_of_the_context_ends_with_it(client, engine):
    """The answer ends where the context does (finish "length"), min_tokens or not; a Sampling refuses more
    min_tokens than max_new_tokens."""
    context = engine.processor.tokenizer.model_max_length
    ids = engine.processor.tokenizer(PROMPT)["input_ids"]
    prompt = ids[:1] + [ids[-2]] * (context - 5 - len(ids)) + ids[1:]  # 5 tokens of room
    answer = complete(client, prompt, max_tokens=16, extra_body={"min_tokens": 16})
    assert answer.usage.prompt_tokens == context - 5
    assert answer.usage.completion_tokens == 5 and answer.choices[0].finish_reason == "length"
    assert Sampling(0.0, 1.0, 10, min_tokens=10).min_tokens == 10
    with pytest.raises(ValueError, match="min_tokens"):
        Sampling(0.0, 1.0, 10, min_tokens=11)


def test_plain_temperature_sampling_draws_from_the_whole_distribution():
    """top_p 1 with no top_k or min_p (the API's default) cuts nothing: the draw is the multinomial's over softmax."""
    from engine.decoding import next_tokens

    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 4
    drawn = next_tokens(logits, [Sampling(0.7, 1.0, 8, seed=5)] * 3, [torch.Generator().manual_seed(row) for row in range(3)], [])
    expected = [int(torch.multinomial(torch.softmax(logits[row] / 0.7, dim=-1), 1, generator=torch.Generator().manual_seed(row))[0])
                for row in range(3)]
    assert drawn == expected
