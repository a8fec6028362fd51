"""llava-serve's structured outputs: OpenAI's response_format (json_schema, json_object), vLLM's structured_outputs
and guided_* fields, SGLang's regex and ebnf, checked with the official openai client (its `parse` included): every
answer follows what it asked for, greedy picks the model's most likely allowed token, the rules stay their own
request's in a batch, and a spec that gives no grammar is a 400 naming its field."""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import openai
import pydantic
import pytest
import torch

from engine import structured_output
from engine.decoding import Sampling, next_tokens
from engine.structured_output import Structure
from test_serve import CIRCLES, MODEL, ask, client, conversations, engine, refused, streamed  # noqa: F401
from test_serve_completions import PROMPT, complete

COLORS = ["red", "blue", "green", "yellow", "purple"]
SCHEMA = {"type": "object", "properties": {"color": {"type": "string", "enum": COLORS}, "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["color", "count"], "additionalProperties": False}


class Shape(pydantic.BaseModel):
    color: Literal["red", "blue", "green", "yellow", "purple"]
    count: int = pydantic.Field(ge=0, le=9)  # unbounded, the shapes model writes digits to the token limit


def follows_schema(text: str) -> dict:
    found = json.loads(text)
    assert set(found) == {"color", "count"} and found["color"] in COLORS and found["count"] in range(10)
    return found


def test_the_official_clients_parse_gets_an_object_of_its_model(client):
    answer = client.chat.completions.parse(model=MODEL, messages=CIRCLES, response_format=Shape, temperature=0, max_tokens=40)
    choice = answer.choices[0]
    assert isinstance(choice.message.parsed, Shape) and choice.finish_reason == "stop"
    # laid out as json.dumps lays it out (no whitespace of the model's choosing between the tokens)
    assert choice.message.content == json.dumps(choice.message.parsed.model_dump())


def test_json_schema_and_json_object_answers_parse(client):
    plain = ask(client, CIRCLES).choices[0].message.content
    with pytest.raises(ValueError):
        json.loads(plain)  # what the model says unconstrained is no JSON
    schema = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA, "strict": True}}
    follows_schema(ask(client, CIRCLES, response_format=schema).choices[0].message.content)
    assert isinstance(json.loads(ask(client, CIRCLES, response_format={"type": "json_object"}).choices[0].message.content), dict)
    # vLLM's spellings of the same
    follows_schema(ask(client, CIRCLES, extra_body={"structured_outputs": {"json": SCHEMA}}).choices[0].message.content)
    follows_schema(ask(client, CIRCLES, extra_body={"guided_json": json.dumps(SCHEMA)}).choices[0].message.content)
    # a sampled answer follows it too, whatever it draws
    for seed in range(4):
        follows_schema(ask(client, CIRCLES, response_format=schema, temperature=1.0, seed=seed).choices[0].message.content)


def test_regex_choice_and_grammar_hold_every_answer(client):
    for body, pattern in [({"structured_outputs": {"regex": r"The circle is (red|blue)\."}}, r"The circle is (red|blue)\."),
                          ({"guided_regex": "[0-9]{3}"}, "[0-9]{3}"), ({"regex": "(yes|no)"}, "(yes|no)"),
                          ({"guided_choice": COLORS}, "|".join(COLORS)), ({"structured_outputs": {"choice": ['say "hi"', "a\\b"]}}, r'say "hi"|a\\b'),
                          ({"guided_grammar": 'root ::= "It is " ("red" | "blue") "."'}, r"It is (red|blue)\."),
                          ({"ebnf": 'root ::= [a-c] [a-c]? "!"'}, "[a-c][a-c]?!")]:
        for options in [{}, {"temperature": 1.0, "seed": 3}]:
            answer = ask(client, CIRCLES, extra_body=body, **options).choices[0]
            assert re.fullmatch(pattern, answer.message.content), (body, options, answer.message.content)
            assert answer.finish_reason == "stop", body


def test_greedy_takes_the_models_most_likely_token_of_those_allowed(client, engine):
    """A one-digit answer: the digit whose score is highest after the prompt, as a forward of the model says."""
    ids = engine.processor.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        scores = engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
    digits = {token: engine.processor.tokenizer.decode([token]) for token in range(scores.shape[0])}
    digits = [token for token, text in digits.items() if len(text) == 1 and text.isdigit()]
    best = max(digits, key=lambda token: float(scores[token]))
    answer = complete(client, PROMPT, logprobs=3, extra_body={"structured_outputs": {"regex": "[0-9]"}}).choices[0]
    assert answer.text == engine.processor.tokenizer.decode([best]) and answer.finish_reason == "stop"
    assert int(scores.argmax()) not in digits  # the grammar changed this answer
    # its log-probabilities are the model's own, before the grammar: the most likely alternative is no digit
    top = answer.logprobs.top_logprobs[0]
    assert not max(top, key=top.get).isdigit() and answer.logprobs.token_logprobs[0] == pytest.approx(top[answer.text]), top


def test_streamed_equals_whole_and_a_token_limit_ends_it_early(client):
    body = {"response_format": {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}}
    whole = ask(client, CIRCLES, extra_body=body).choices[0].message.content
    assert streamed(client, CIRCLES, extra_body=body)[0] == whole
    cut = ask(client, CIRCLES, extra_body=body, max_tokens=3).choices[0]
    assert cut.finish_reason == "length" and whole.startswith(cut.message.content)
    # ignore_eos decodes on through end tokens, but nothing may follow a complete grammar
    ended = ask(client, CIRCLES, extra_body={"guided_choice": COLORS, "ignore_eos": True}).choices[0]
    assert ended.message.content in COLORS and ended.finish_reason == "stop"


def test_rules_stay_their_own_requests_in_a_batch(client, engine):
    requests = conversations()[:4]
    plain = [ask(client, messages).choices[0].message.content for messages in requests]
    shaped = [ask(client, messages, extra_body={"guided_json": SCHEMA}).choices[0].message.content for messages in requests]
    engine.scheduler.peak_batch = 0
    with ThreadPoolExecutor(8) as pool:
        plains = [pool.submit(ask, client, messages) for messages in requests]
        shapes = [pool.submit(ask, client, messages, extra_body={"guided_json": SCHEMA}) for messages in requests]
        assert [future.result().choices[0].message.content for future in plains] == plain
        assert [future.result().choices[0].message.content for future in shapes] == shaped
    assert engine.scheduler.peak_batch > 1
    # n choices each follow it
    answer = ask(client, CIRCLES, n=3, temperature=1.0, seed=1, extra_body={"guided_choice": COLORS})
    assert len(answer.choices) == 3 and all(choice.message.content in COLORS for choice in answer.choices)


def deep(levels: int) -> dict:
    """A schema of objects nested `levels` deep (xgrammar's conversion of one 300 deep took seconds)."""
    schema = {"type": "string"}
    for _ in range(levels - 1):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


def test_a_spec_without_a_grammar_is_a_400_naming_its_field(client):
    cases = [
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", "parenthesis"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "response_format", "Type should"),
        ({"guided_json": "{not json"}, "guided_json", "no grammar"),
        ({"guided_grammar": 'root ::= "a" |'}, "guided_grammar", "no grammar"),
        ({"guided_choice": []}, "guided_choice", "at least one"),
        ({"guided_choice": ["a", ""]}, "guided_choice", "empty"),
        ({"guided_regex": "a" * 70_000}, "guided_regex", "at most"),
        ({"guided_json": deep(33)}, "guided_json", "more than 32 deep"),
        # what its grammar would let an answer break while it still ends complete
        ({"guided_json": {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}}, "guided_json",
         "uses uniqueItems at properties.tags"),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]}}, "guided_json", "requires 'b'"),
        ({"guided_json": {"anyOf": [{"not": {"type": "integer"}}]}}, "guided_json", "uses not at anyOf.0"),
        ({"guided_json": {"$ref": "http://example.com/s.json"}}, "guided_json", "another document"),
        ({"guided_json": {"type": "object", "properties": {"a": {}, "b": {}}, "dependencies": {"a": ["b"]}}}, "guided_json",
         "uses dependencies"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "give one"),
        ({"guided_choice": COLORS, "min_tokens": 2}, "min_tokens", "structured output"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs.structural_tag", "neither"),
        ({"structured_outputs": {"structural_tag": "[1"}}, "structured_outputs.structural_tag", "not a JSON object"),
        ({"response_format": {"type": "structural_tag", "format": {"type": "nope"}}}, "response_format", "not recognized"),
        ({"response_format": {"type": "structural_tag", "structures": [{"begin": "<a>", "schema": {"not": {}}, "end": "</a>"}],
                              "triggers": ["<a>"]}}, "response_format", "uses not"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs its json_schema"),
        ({"guided_grammar": "root ::= root"}, "guided_grammar", "allows no answer"),  # found by the engine's walk
        ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
        ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "not supported"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required", "guided_regex": "a"}, "tools",
         "give one"),
    ]
    for body, param, words in cases:
        error = refused(lambda: ask(client, CIRCLES, extra_body=body))
        assert error.status_code == 400, body
        assert error.body["param"] == param and words in error.body["message"], (body, error.body)
    # the same through /v1/completions, which takes them too
    error = refused(lambda: complete(client, PROMPT, extra_body={"guided_regex": "(unclosed"}))
    assert error.status_code == 400 and error.body["param"] == "guided_regex"
    assert re.fullmatch("[0-9]{2}", complete(client, PROMPT, extra_body={"guided_regex": "[0-9]{2}"}).choices[0].text)
    # a property named as a keyword is a name, and an allOf of one schema (pydantic 1's for a described field) is held
    fine = {"type": "object", "properties": {"not": {"allOf": [{"type": "integer", "minimum": 0, "maximum": 9}]}}, "required": ["not"]}
    assert json.loads(ask(client, CIRCLES, extra_body={"guided_json": fine}).choices[0].message.content)["not"] in range(10)
    # 32 levels pass (each "properties" is one more: 16 objects here)
    nested = ask(client, CIRCLES, extra_body={"guided_json": deep(16)}, max_tokens=200).choices[0]
    assert isinstance(json.loads(nested.message.content), dict) and nested.finish_reason == "stop"
    # and the server goes on; a neutral response_format asks for nothing
    assert ask(client, CIRCLES, response_format={"type": "text"}).choices[0].message.content == ask(client, CIRCLES).choices[0].message.content


def test_a_row_with_no_allowed_token_left_ends_alone(engine):
    """Its grammar's every token suppressed: no token is drawn for it (a draw from all -inf would fail the batch)."""
    tokenizer = engine.processor.tokenizer
    digits = [token for token in range(len(tokenizer)) if tokenizer.decode([token]).isdigit()]
    stuck = engine.grammars.constraint(Structure("regex", "[0-9]"))
    free = engine.grammars.constraint(Structure("regex", "[0-9]"))
    logits = torch.randn(3, engine.scheduler.vocabulary)
    samplings = [Sampling(temperature=1.0, top_p=1.0), Sampling(temperature=0), Sampling(temperature=1.0, top_p=1.0)]
    blocked = [set(digits), set(), set()]
    tokens = next_tokens(logits, samplings, [None] * 3, [], blocked, constraints=[stuck, free, None])
    assert tokens[0] is None and tokens[1] in digits and tokens[2] is not None


def test_special_tokens_are_never_text_and_a_chat_answer_keeps_its_grammars_spaces(client):
    """`<s>` in a grammar is the text, not the special token (which the reader never sees); control characters in
    choices are themselves (a hex digit after one is not part of its escape); a chat answer held to a grammar is
    not stripped as plain chat answers are."""
    assert ask(client, CIRCLES, extra_body={"guided_regex": "x<s>y"}).choices[0].message.content == "x<s>y"
    assert ask(client, CIRCLES, extra_body={"guided_regex": "[a-z<>/]+", "logit_bias": {"2": 100}}).choices[0].message.content
    for choice in ["1\n2", "a\tbc", "a\u0000b", "x\x7f9", "   lead", "end\n"]:
        assert ask(client, CIRCLES, extra_body={"guided_choice": [choice]}).choices[0].message.content == choice, repr(choice)


def test_the_engines_walk_refuses_a_grammar_whose_masks_grow_slow(client):
    """Nested bounded repetitions: the mask of one token grew to 48 s by the 31st token of a walk through the
    lowest token ids. The walk, in the request's thread, finds the first mask over its budget: a 400 at once."""
    start = time.perf_counter()
    error = refused(lambda: ask(client, CIRCLES, extra_body={"structured_outputs": {"regex": "((((a|b){0,30}){0,30}){0,30}){0,30}c"}}))
    assert error.status_code == 400 and error.body["param"] == "structured_outputs.regex" and "per token" in error.body["message"]
    assert time.perf_counter() - start < 2


def test_a_grammar_that_stalls_the_batch_ends_its_answer_and_is_refused_after(client, monkeypatch):
    """The guard behind the walk (none here): tens of milliseconds per token's mask, on the scheduler's thread. The
    answer ends with a 400 within its budget (a tenth of the default here, so that a faster machine is over it
    too), and the same spec again is refused at once."""
    monkeypatch.setattr(structured_output, "PROBE_TOKENS", 0)
    monkeypatch.setattr(structured_output, "STEP_BUDGET", 0.005)
    body = {"guided_regex": "((((a|b){0,50}){0,50}){0,50}){0,50}c"}
    error = refused(lambda: ask(client, CIRCLES, extra_body=body))
    assert error.status_code == 400 and "ms" in error.body["message"] and error.body["param"] == "guided_regex", error.body
    start = time.perf_counter()
    again = refused(lambda: ask(client, CIRCLES, extra_body=body))
    assert again.status_code == 400 and time.perf_counter() - start < 0.5
    # streamed, the stream has begun when the grammar turns slow (here: the walk may also find it first, a 400): it
    # ends with an error event naming the field
    with pytest.raises(openai.APIError) as caught:
        for _ in client.chat.completions.create(model=MODEL, messages=CIRCLES, temperature=0, max_tokens=40, stream=True,
                                                extra_body={"guided_regex": "((((a|b){0,40}){0,40}){0,40}){0,40}c"}):
            pass
    assert "ms" in str(caught.value.message) and caught.value.body["param"] == "guided_regex", caught.value.body
    assert ask(client, CIRCLES).choices[0].message.content  # the server goes on


def test_a_step_whose_masks_cost_too_much_together_ends_the_costliest_answers():
    """n choices of one spec, each under its own budget, still made every step wait for all of their masks."""
    class Costing(structured_output.Constraint):
        def __init__(self, seconds: float):
            super().__init__(None)
            self.seconds = seconds

        def fill(self, bitmask, row):  # allows every token, as if it had spent `seconds`
            bitmask[row] = -1
            return self.seconds

    budget = structured_output.STEP_BUDGET
    costly, also, cheap = Costing(budget * 0.6), Costing(budget * 0.6), Costing(budget * 0.01)
    logits = torch.zeros(4, 64)
    structured_output.rule_out(logits, [costly, None, also, cheap])
    assert costly.slow and also.slow and "a step" in costly.slow and cheap.slow is None
    assert not logits.isneginf().any()  # their masks (every token) were applied all the same
    alone = Costing(budget * 0.6)
    structured_output.rule_out(torch.zeros(1, 64), [alone])
    assert alone.slow is None  # under the budget alone


def test_a_structural_tag_holds_its_tagged_json_and_triggers_wait_for_their_trigger(client):
    """vLLM's structural tags, through xgrammar: a tag that must come (xgrammar's format) gives its begin, its content
    (here a regex's: JSON in a tag may have any whitespace, which xgrammar's tags do not let a request rule out, and
    the shapes model fills) and its end; vLLM's earlier form (structures and triggers) leaves the text free until a
    trigger comes."""
    schema = {"type": "object", "properties": {"color": {"enum": COLORS}}, "required": ["color"]}
    tagged = {"type": "structural_tag", "format": {"type": "tag", "begin": "<answer>", "end": "</answer>",
                                                     "content": {"type": "regex", "pattern": "|".join(COLORS)}}}
    for field in ({"response_format": tagged}, {"structured_outputs": {"structural_tag": json.dumps(tagged)}}):
        for temperature in (0.0, 1.0):
            answer = ask(client, CIRCLES, temperature=temperature, seed=1, max_tokens=40, extra_body=field).choices[0]
            assert re.fullmatch(f"<answer>({'|'.join(COLORS)})</answer>", answer.message.content), answer.message.content
            assert answer.finish_reason == "stop"
    plain = ask(client, CIRCLES).choices[0].message.content
    waiting = {"type": "structural_tag", "triggers": ["<call="],
               "structures": [{"begin": "<call=color>", "schema": schema, "end": "</call>"}]}
    free = ask(client, CIRCLES, extra_body={"response_format": waiting})
    # no trigger came: the model's own answer, raw as a structured answer's text is (its leading space kept)
    assert free.choices[0].message.content.strip() == plain and free.choices[0].finish_reason == "stop"
