"""Token log-probabilities from llava-serve, checked against one forward of the model over the whole text: a text
completion's (`logprobs`, and with `echo` the prompt's, as lm-eval's loglikelihood and multiple-choice tasks ask
for them), a chat completion's (`logprobs`, `top_logprobs`), streamed and whole; and the scheduler's scoring of a
prompt beside answers decoding, in both kinds of batch."""

import math

import httpx
import pytest
import torch
from operator import itemgetter

from engine import row_batch, scheduler as scheduling
from engine.decoding import Sampling, TokenLogprob
from engine.scheduler import Scheduler, Sequence
from engine.token_logprobs import FLOOR, TokenTexts, completion_logprobs
from test_serve import CIRCLES, MODEL, client, engine, refused  # noqa: F401
from test_serve_completions import PROMPT, _Dropping, complete


def model_logprobs(engine, ids: list[int]) -> torch.Tensor:
    """(T, V): the log-softmax of the model's scores after each prefix of `ids`, one forward, no cache."""
    with torch.no_grad():
        return engine.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def lm_eval_parse(response: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval's local-completions reading of a loglikelihood response (its parse_logprobs, restated): the sum of the
    continuation's token log-probabilities, and whether each was the most likely."""
    results = []
    for choice, ctxlen in zip(sorted(response["choices"], key=itemgetter("index")), ctxlens):
        logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        results.append((sum(logprobs), all(value == max(top.values()) for value, top in zip(logprobs, tops))))
    return results


def post(client, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{str(client.base_url).rstrip('/')}/{path}", json={"model": MODEL, **body}, timeout=60)


def test_lm_evals_loglikelihood_request_gets_the_models_own_log_probabilities(client, engine):
    tokenizer = engine.processor.tokenizer
    context = tokenizer(PROMPT)["input_ids"]
    scored = model_logprobs(engine, context)
    greedy = [int(scored[-1].argmax())]
    likely = greedy + [int(scored[-1].topk(5).indices[4])]  # the model's best next token, and its fifth best
    requests = [context + [token] for token in likely] + [context + tokenizer(" red", add_special_tokens=False)["input_ids"]]
    # lm-eval's payload, several requests in one (batch_size > 1), prompts as token ids
    response = post(client, "completions", {"prompt": requests, "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True,
                                            "seed": 1234})
    assert response.status_code == 200, response.text
    body = response.json()
    for ids, choice in zip(requests, body["choices"]):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(ids) + 1  # every prompt token and the one generated
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        expected = model_logprobs(engine, ids)
        for position in range(1, len(ids)):
            assert math.isclose(logprobs["token_logprobs"][position], float(expected[position - 1, ids[position]]), abs_tol=1e-4)
            assert len(logprobs["top_logprobs"][position]) in (1, 2)  # the best, and the token itself
        # the generated token is the greedy one after the whole prompt, its log-probability the best
        assert math.isclose(logprobs["token_logprobs"][-1], float(expected[-1].max()), abs_tol=1e-4)
        assert choice["text"].startswith(tokenizer.decode(ids, skip_special_tokens=True))  # echoed
        assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0
    parsed = lm_eval_parse(body, [len(context)] * len(requests))
    assert parsed[0][1] is True and parsed[1][1] is False  # the greedy token is greedy; the fifth best is not
    assert math.isclose(parsed[0][0], float(scored[-1, greedy[0]]), abs_tol=1e-4)
    assert math.isclose(parsed[1][0], float(scored[-1, likely[1]]), abs_tol=1e-4)
    assert parsed[0][0] > parsed[1][0]
    assert body["usage"]["prompt_tokens"] == sum(map(len, requests)) and body["usage"]["completion_tokens"] == 3
    # asked again, the prompts are in the prefix cache; a scored prompt is fed whole all the same, and scores the same
    again = post(client, "completions", {"prompt": requests[0], "temperature": 0, "max_tokens": 1, "logprobs": 1, "echo": True}).json()
    assert again["choices"][0]["logprobs"] == body["choices"][0]["logprobs"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_text_prompt_scored_alone_with_max_tokens_0_echoes_and_generates_nothing(client, engine):
    ids = engine.processor.tokenizer(PROMPT)["input_ids"]
    body = post(client, "completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 3}).json()
    choice = body["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 0
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) and logprobs["token_logprobs"][0] is None
    expected = model_logprobs(engine, ids)
    best = expected.topk(3)
    for position in range(1, len(ids)):
        top = logprobs["top_logprobs"][position]
        assert 3 <= len(top) <= 4 and math.isclose(max(top.values()), float(best.values[position - 1, 0]), abs_tol=1e-4)
    # the prompt's tokens' texts join into the prompt (the start token shows its name and takes no place)
    texts = [text for text, token in zip(logprobs["tokens"], ids) if token not in engine.processor.tokenizer.all_special_ids]
    assert "".join(texts) == PROMPT
    echoed = post(client, "completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True}).json()["choices"][0]
    assert echoed["text"] == PROMPT and echoed["logprobs"] is None


def test_a_completions_tokens_come_with_their_log_probabilities_and_offsets_into_its_text(client, engine):
    tokenizer = engine.processor.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    plain = complete(client, PROMPT, max_tokens=8)  # it ends (its end token) after 12
    answer = complete(client, PROMPT, logprobs=2, max_tokens=8)
    choice = answer.choices[0]
    assert choice.text == plain.choices[0].text  # asking for log-probabilities changes no answer
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == answer.usage.completion_tokens
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:index])) for index in range(len(logprobs.tokens))]
    tokens = tokenizer(PROMPT + choice.text)["input_ids"][len(ids):]
    expected = model_logprobs(engine, ids + tokens)
    for position, (value, top) in enumerate(zip(logprobs.token_logprobs, logprobs.top_logprobs)):
        assert math.isclose(value, float(expected[len(ids) + position - 1].max()), abs_tol=1e-4)  # greedy: the best
        assert len(top) == 2 and max(top.values()) == value  # the token is one of its two best: the dict has two
    # sampled, the log-probabilities are the model's own (before temperature), of the tokens drawn
    sampled = complete(client, PROMPT, temperature=1.5, seed=7, logprobs=0, max_tokens=8,
                       extra_body={"return_tokens_as_token_ids": True})  # vLLM's: the tokens by id
    drawn = [int(name.removeprefix("token_id:")) for name in sampled.choices[0].logprobs.tokens]
    assert tokenizer.decode(drawn, skip_special_tokens=True) == sampled.choices[0].text
    expected = model_logprobs(engine, ids + drawn)
    assert drawn[: len(tokens)] != tokens[: len(drawn)]  # not the greedy answer: the seed's draw
    for position, value in enumerate(sampled.choices[0].logprobs.token_logprobs):
        assert math.isclose(value, float(expected[len(ids) + position - 1, drawn[position]]), abs_tol=1e-4)
    # streamed: the chunks' log-probabilities together are the whole answer's
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8, logprobs=2, stream=True))
    streamed = [chunk.choices[0].logprobs for chunk in chunks if chunk.choices and chunk.choices[0].logprobs]
    assert sum((part.tokens for part in streamed), []) == logprobs.tokens
    assert sum((part.text_offset for part in streamed), []) == logprobs.text_offset
    assert sum((part.token_logprobs for part in streamed), []) == logprobs.token_logprobs


def test_an_answer_ended_by_its_end_token_lists_that_token_last(client, engine):
    """As vLLM's: lm-eval drops a response's last log-probability (the generated token's), so an end token left out
    would cost it the prompt's last token. Usage counts that token too, as vLLM's does."""
    tokenizer = engine.processor.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    answer = complete(client, PROMPT, max_tokens=300, logprobs=0)
    assert answer.choices[0].finish_reason == "stop"  # the shapes model ends its descriptions
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == answer.usage.completion_tokens
    assert logprobs.tokens[-1] == tokenizer.eos_token and logprobs.text_offset[-1] == len(answer.choices[0].text)
    whole = tokenizer(PROMPT + answer.choices[0].text)["input_ids"]
    assert math.isclose(logprobs.token_logprobs[-1], float(model_logprobs(engine, whole)[-1, tokenizer.eos_token_id]), abs_tol=1e-4)
    # with echo and a stream too
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=300, logprobs=0, echo=True,
                                            stream=True))
    streamed = [chunk.choices[0].logprobs for chunk in chunks if chunk.choices and chunk.choices[0].logprobs]
    tokens = sum((part.tokens for part in streamed), [])
    assert len(tokens) == len(ids) + answer.usage.completion_tokens and tokens[-1] == tokenizer.eos_token
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == PROMPT + answer.choices[0].text


def test_a_chat_answers_tokens_come_with_their_most_likely_alternatives(client, engine):
    plain = client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=20)
    answer = client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=20, logprobs=True, top_logprobs=3)
    choice = answer.choices[0]
    assert choice.message.content == plain.choices[0].message.content
    content = choice.logprobs.content
    # the chat's content lists the answer's tokens, as OpenAI's, not the end token that usage counts too
    assert len(content) == answer.usage.completion_tokens - (choice.finish_reason == "stop")
    assert "".join(entry.token for entry in content).strip() == choice.message.content
    for entry in content:
        values = [top.logprob for top in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True) and entry.logprob == values[0]  # greedy
        assert bytes(entry.bytes).decode() == entry.token
    streamed = client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=20, logprobs=True,
                                              top_logprobs=3, stream=True)
    entries = [entry for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
               for entry in chunk.choices[0].logprobs.content]
    assert [entry.model_dump() for entry in entries] == [entry.model_dump() for entry in content]
    without = client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=5, logprobs=True)
    assert all(entry.top_logprobs == [] for entry in without.choices[0].logprobs.content)
    # vLLM's names of tokens by id
    named = post(client, "chat/completions", {"messages": CIRCLES, "temperature": 0, "max_tokens": 5, "logprobs": True,
                                              "return_tokens_as_token_ids": True}).json()
    assert all(entry["token"].startswith("token_id:") for entry in named["choices"][0]["logprobs"]["content"])


def test_log_probabilities_asked_for_wrongly_are_refused_by_name(client):
    for path, body, param in [("chat/completions", {"messages": CIRCLES, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                              ("chat/completions", {"messages": CIRCLES, "top_logprobs": 2}, "top_logprobs"),
                              ("completions", {"prompt": PROMPT, "logprobs": 21}, "logprobs"),
                              ("completions", {"prompt": PROMPT, "logprobs": -1}, "logprobs"),
                              ("completions", {"prompt": PROMPT, "max_tokens": 0, "logprobs": 1}, "max_tokens"),
                              ("completions", {"prompt": PROMPT, "prompt_logprobs": 21}, "prompt_logprobs"),  # vLLM's own
                              ("chat/completions", {"messages": CIRCLES, "prompt_logprobs": True}, "prompt_logprobs")]:
        response = post(client, path, body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    # what clients send by habit passes
    assert post(client, "chat/completions", {"messages": CIRCLES, "max_tokens": 2, "logprobs": False, "top_logprobs": 0}).status_code == 200


def test_token_texts_join_into_the_text_a_dropping_tokenizer_decodes():
    tokenizer = _Dropping()
    prompt, answer = tokenizer.ids("The circle is"), tokenizer.ids(" red.")
    texts = TokenTexts(tokenizer.fast, prompt)
    scored = [TokenLogprob(token, -0.5, ((token, -0.5),)) for token in answer]
    layout, end = completion_logprobs(texts, answer, scored, 0)
    assert layout["tokens"] == [" red", "."] and layout["text_offset"] == [0, 4] and end == 5
    # a token the model rules out: JSON has no -inf
    layout, _ = completion_logprobs(TokenTexts(tokenizer.fast), [answer[0]], [TokenLogprob(answer[0], -math.inf, ())], 0)
    assert layout["token_logprobs"] == [FLOOR]


@pytest.mark.parametrize("padded", [False, True])
def test_a_scored_prompt_joins_a_batch_decoding_and_leaves_it_as_it_was(engine, padded, monkeypatch):
    if padded:
        monkeypatch.setattr(row_batch.RowBatch, "supports", staticmethod(lambda model: False))
    scheduler = Scheduler(engine.model, [])
    ids = engine.processor.tokenizer(PROMPT)["input_ids"]
    config = engine.model.config.get_text_config()
    from transformers import DynamicCache

    def sequence(sampling):
        return Sequence(DynamicCache(config=config), torch.tensor([ids]), {}, sampling, set())

    decoding = scheduler.submit(sequence(Sampling(0.0, 1.0, 30, ignore_eos=True)))
    scored = scheduler.submit(sequence(Sampling(0.0, 1.0, 3, logprobs=2, prompt_logprobs=2)))
    only = scheduler.submit(sequence(Sampling(0.0, 1.0, 0, prompt_logprobs=0)))
    for each in (decoding, scored, only):
        assert each.done.wait(60) and each.error is None
    expected = model_logprobs(engine, ids)
    for each in (scored, only):
        assert each.prompt_logprobs[0] is None and len(each.prompt_logprobs) == len(ids)
        for position, found in enumerate(each.prompt_logprobs[1:], start=1):
            assert found.token == ids[position] and math.isclose(found.logprob, float(expected[position - 1, ids[position]]), abs_tol=1e-4)
    assert [len(found.top) for found in scored.prompt_logprobs[1:]] == [2] * (len(ids) - 1)
    assert only.tokens == [] and only.finish_reason == "length" and only.cache.get_seq_length() == len(ids)
    assert len(scored.logprobs) == len(scored.tokens) == 3 and scored.tokens == decoding.tokens[:3]
    assert len(decoding.tokens) == 30 and decoding.logprobs == []  # not asked: none computed


@pytest.mark.parametrize("padded", [False, True])
def test_prompts_scored_together_each_get_their_own_log_probabilities(engine, padded, monkeypatch):
    """Three prompts of 5, 20 and 31 tokens arriving at once, at most 64 padded positions a forward: the first two
    together (left-padded to 20), the third alone; each one's scores are those of its tokens alone, and so are the
    answers they go on to."""
    if padded:
        monkeypatch.setattr(row_batch.RowBatch, "supports", staticmethod(lambda model: False))
    monkeypatch.setattr(scheduling, "SCORED_LOGITS", 64 * engine.model.config.get_text_config().vocab_size)
    scheduler = Scheduler(engine.model, [])  # stepped here, on the test's thread: no submit
    config = engine.model.config.get_text_config()
    from transformers import DynamicCache
    torch.manual_seed(0)
    prompts = [torch.randint(3, 700, (count,)).tolist() for count in (31, 5, 20)]
    sequences = [Sequence(DynamicCache(config=config), torch.tensor([ids]), {}, Sampling(0.0, 1.0, 4, logprobs=1, prompt_logprobs=1,
                                                                                          ignore_eos=True), set())
                 for ids in prompts]
    scheduler._join(sequences)
    assert scheduler.counts["prefill_forwards"] == 2 and scheduler.counts["prefill_sequences"] == 3
    while not all(sequence.done.is_set() for sequence in sequences):
        scheduler._decode()
    for ids, sequence in zip(prompts, sequences):
        expected = model_logprobs(engine, ids + sequence.tokens)
        for position, found in enumerate(sequence.prompt_logprobs[1:], start=1):
            assert math.isclose(found.logprob, float(expected[position - 1, ids[position]]), abs_tol=1e-4)
            assert found.top[0][0] == int(expected[position - 1].argmax())
        assert sequence.tokens == [int(expected[len(ids) + step - 1].argmax()) for step in range(4)]  # greedy, as alone
        for step, found in enumerate(sequence.logprobs):
            assert math.isclose(found.logprob, float(expected[len(ids) + step - 1].max()), abs_tol=1e-4)


def test_log_probabilities_are_the_models_own_where_min_tokens_rules_the_end_token_out(client, engine):
    """The answer ends with its end token after 11 tokens; with min_tokens 20 the end token is blocked from there on,
    but what is reported is the model's own distribution, not the one renormalized without it."""
    tokenizer = engine.processor.tokenizer
    ids = tokenizer(PROMPT)["input_ids"]
    answer = complete(client, PROMPT, max_tokens=20, logprobs=1, extra_body={"min_tokens": 20, "return_tokens_as_token_ids": True})
    drawn = [int(name.removeprefix("token_id:")) for name in answer.choices[0].logprobs.tokens]
    assert len(drawn) == 20
    expected = model_logprobs(engine, ids + drawn)
    # the end token was the likely one after 11 tokens (the drawn token's share there is small, not renormalized)
    assert max(float(expected[len(ids) + position - 1, tokenizer.eos_token_id]) for position in range(20)) > -1
    for position, value in enumerate(answer.choices[0].logprobs.token_logprobs):
        assert math.isclose(value, float(expected[len(ids) + position - 1, drawn[position]]), abs_tol=1e-4), position


def test_a_prompt_whose_scores_are_not_numbers_is_a_500_naming_the_token_and_the_server_goes_on(client, engine):
    def poisoned(module, args, kwargs, output):
        if output.logits.shape[1] > 5:  # the scored prompt's forward only
            output.logits[:, 3] = float("nan")
        return output

    hook = engine.model.register_forward_hook(poisoned, with_kwargs=True)
    try:
        response = post(client, "completions", {"prompt": PROMPT, "max_tokens": 1, "logprobs": 1, "echo": True})
    finally:
        hook.remove()
    assert response.status_code == 500 and response.json()["error"]["code"] == "model_output_not_finite", response.text
    assert "prompt's token 3" in response.json()["error"]["message"]
    assert complete(client, PROMPT, logprobs=1, echo=True, max_tokens=1).choices[0].logprobs.token_logprobs[4] is not None


def test_characters_split_across_tokens_join_whole_and_offsets_only_grow(client, engine):
    tokenizer = engine.processor.tokenizer
    text = "A red \u2603 circle \u00e9"  # a snowman is three bytes, three byte-level tokens here
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [piece[0] for piece in TokenTexts(tokenizer).after(ids, [[token] for token in ids])]
    assert "".join(piece.text for piece in pieces) == text
    assert b"".join(bytes(piece.bytes) for piece in pieces) == text.encode()
    assert any(piece.text == "" and piece.bytes for piece in pieces)  # part of the snowman: bytes, no text yet
    for as_ids in (False, True):
        body = post(client, "completions", {"prompt": text, "max_tokens": 3, "echo": True, "logprobs": 2,
                                            "return_tokens_as_token_ids": as_ids}).json()
        offsets = body["choices"][0]["logprobs"]["text_offset"]
        assert offsets == sorted(offsets) and offsets[-1] <= len(body["choices"][0]["text"]), offsets


def test_what_a_request_does_not_ask_for_is_not_computed(client, engine):
    before = dict(engine.scheduler.counts)
    echoed = post(client, "completions", {"prompt": PROMPT, "max_tokens": 0, "echo": True}).json()
    assert echoed["choices"][0]["text"] == PROMPT and echoed["usage"]["completion_tokens"] == 0
    assert engine.scheduler.counts == before  # no forward at all
    for path, body in [("completions", {"prompt": PROMPT, "logprobs": True}), ("completions", {"prompt": PROMPT, "echo": "yes"}),
                       ("chat/completions", {"messages": CIRCLES, "logprobs": 1}),
                       ("chat/completions", {"messages": CIRCLES, "logprobs": True, "top_logprobs": True})]:
        response = post(client, path, body)
        assert response.status_code == 400, (body, response.text)


@pytest.mark.parametrize("padded", [False, True])
def test_a_prompt_too_long_to_score_in_one_forward_is_scored_in_parts(engine, padded, monkeypatch):
    """At most 7 positions' scores a forward: a prompt of 20 tokens is scored 7, 7, then 6 with its first answer
    token, each part after the ones before (its cache), and its scores and answer are those of one forward."""
    if padded:
        monkeypatch.setattr(row_batch.RowBatch, "supports", staticmethod(lambda model: False))
    monkeypatch.setattr(scheduling, "SCORED_LOGITS", 7 * engine.model.config.get_text_config().vocab_size)
    scheduler = Scheduler(engine.model, [])
    from transformers import DynamicCache
    torch.manual_seed(1)
    ids = torch.randint(3, 700, (20,)).tolist()
    sequence = Sequence(DynamicCache(config=engine.model.config.get_text_config()), torch.tensor([ids]), {},
                        Sampling(0.0, 1.0, 3, logprobs=0, prompt_logprobs=2, ignore_eos=True), set())
    scheduler._join([sequence])
    assert scheduler.counts["prefill_forwards"] == 3
    while not sequence.done.is_set():
        scheduler._decode()
    expected = model_logprobs(engine, ids + sequence.tokens)
    assert sequence.prompt_logprobs[0] is None and len(sequence.prompt_logprobs) == len(ids)
    for position, found in enumerate(sequence.prompt_logprobs[1:], start=1):
        assert found.token == ids[position] and math.isclose(found.logprob, float(expected[position - 1, ids[position]]), abs_tol=1e-4)
        assert [token for token, _ in found.top] == expected[position - 1].topk(2).indices.tolist()
    assert sequence.tokens == [int(expected[len(ids) + step - 1].argmax()) for step in range(3)]
    assert sequence.cache.get_seq_length() == len(ids) + 2  # every token fed but the last answer token
    # one whose reader left is not scored on: it ends without a forward
    gone = Sequence(DynamicCache(config=engine.model.config.get_text_config()), torch.tensor([ids]), {},
                    Sampling(0.0, 1.0, 3, prompt_logprobs=0), set())
    gone.cancel()
    forwards = scheduler.counts["prefill_forwards"]
    scheduler._score([gone])
    assert gone.done.is_set() and gone.error is None and scheduler.counts["prefill_forwards"] == forwards


def test_a_prompt_scored_in_parts_through_the_server_scores_as_in_one(client, engine, monkeypatch):
    body = {"prompt": [PROMPT, PROMPT + " The"], "max_tokens": 2, "echo": True, "logprobs": 2, "temperature": 0}
    whole = post(client, "completions", body).json()
    monkeypatch.setattr(scheduling, "SCORED_LOGITS", 5 * engine.scheduler.vocabulary)
    forwards = engine.scheduler.counts["prefill_forwards"]
    parts = post(client, "completions", body).json()
    assert engine.scheduler.counts["prefill_forwards"] - forwards >= 2 * 4  # 20-odd tokens at 5 a forward, each prompt
    for one, several in zip(whole["choices"], parts["choices"]):
        assert several["text"] == one["text"] and several["logprobs"]["tokens"] == one["logprobs"]["tokens"]
        assert all(a == b or math.isclose(a, b, abs_tol=1e-4)
                   for a, b in zip(several["logprobs"]["token_logprobs"][1:], one["logprobs"]["token_logprobs"][1:]))
