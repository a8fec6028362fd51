"""llava-serve's tool calling (tools, tool_choice, parallel_tool_calls) with the official openai client on loopback:
a forced call's arguments follow its function's parameters, "required" makes calls of the tools given, "auto" and
"none" answer in text as the model does, streamed calls add up (in the client's own accumulator) to the whole
answer's, a conversation carries calls and their results, and what cannot be answered is a 400 naming its field."""

import json
from typing import Literal

import openai
import pydantic
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from engine.answer_text import Progress
from engine.openai_api import ChatRequest, engine_messages, parse_request
from engine.media import MediaPolicy
from engine.tool_calls import ListReader, ToolCallCompletion, ToolPlan
from test_serve import CIRCLES, MODEL, ask, client, engine, refused  # noqa: F401
from test_serve_completions import PROMPT, complete
from test_serve_structured import COLORS, SCHEMA, follows_schema

REPORT = {"type": "function", "function": {"name": "report_shape", "description": "Reports the shape asked about",
                                           "parameters": SCHEMA}}
NO_ARGUMENTS = {"type": "function", "function": {"name": "look_again"}}
TOOLS = [REPORT, NO_ARGUMENTS]
NAMED = {"type": "function", "function": {"name": "report_shape"}}


class ReportShape(pydantic.BaseModel):
    color: Literal["red", "blue", "green", "yellow", "purple"]
    count: int = pydantic.Field(ge=0, le=9)


def final_of_stream(client, **options) -> openai.types.chat.ChatCompletion:
    """The streamed answer as the official client's own accumulator puts its chunks together."""
    state = ChatCompletionStreamState()  # its snapshot: get_final_completion refuses an answer cut off by its limit
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **{"temperature": 0, "max_tokens": 60, **options}):
        state.handle_chunk(chunk)
    return state.current_completion_snapshot


def calls_of(answer) -> list[tuple[str, dict]]:
    message = answer.choices[0].message
    assert message.content is None and all(call.id.startswith("call_") and call.type == "function" for call in message.tool_calls)
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)
    return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls]


def test_a_forced_call_follows_its_functions_parameters_as_the_schema_would(client):
    answer = ask(client, CIRCLES, tools=TOOLS, tool_choice=NAMED, max_tokens=60)
    [(name, arguments)] = calls_of(answer)
    assert name == "report_shape" and answer.choices[0].finish_reason == "stop"  # OpenAI's for a named call
    follows_schema(json.dumps(arguments))
    # held to the same grammar as that schema asked as a response format: greedy, the same text
    schema = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SCHEMA}}
    assert answer.choices[0].message.tool_calls[0].function.arguments == \
        ask(client, CIRCLES, response_format=schema, max_tokens=60).choices[0].message.content
    # sampled, every draw follows it
    for seed in range(3):
        follows_schema(ask(client, CIRCLES, tools=TOOLS, tool_choice=NAMED, temperature=1.0, seed=seed,
                           max_tokens=60).choices[0].message.tool_calls[0].function.arguments)
    # a token limit ends it early: the arguments so far, finish "length"
    short = ask(client, CIRCLES, tools=TOOLS, tool_choice=NAMED, max_tokens=3).choices[0]
    assert short.finish_reason == "length" and short.message.tool_calls[0].function.arguments.startswith("{")


def test_the_official_clients_parse_gets_its_strict_functions_arguments(client):
    answer = client.chat.completions.parse(model=MODEL, messages=CIRCLES, tools=[openai.pydantic_function_tool(ReportShape)],
                                           tool_choice={"type": "function", "function": {"name": "ReportShape"}},
                                           temperature=0, max_tokens=60)
    parsed = answer.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, ReportShape) and parsed.color in COLORS


def test_required_calls_name_the_tools_given_and_one_only_without_parallel_calls(client):
    one = ask(client, CIRCLES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    [(name, arguments)] = calls_of(one)
    assert one.choices[0].finish_reason == "tool_calls"
    assert name == "look_again" and arguments == {} or name == "report_shape" and follows_schema(json.dumps(arguments))
    only = ask(client, CIRCLES, tools=[REPORT], tool_choice="required", parallel_tool_calls=False, max_tokens=60)
    [(name, arguments)] = calls_of(only)
    assert name == "report_shape" and follows_schema(json.dumps(arguments))
    # parallel calls: as many as the model makes; each one complete, of a tool given (this model goes on to the limit)
    several = ask(client, CIRCLES, tools=TOOLS, tool_choice="required", max_tokens=60)
    calls = calls_of(several)
    assert calls and all(name in ("report_shape", "look_again") for name, _ in calls)
    assert several.choices[0].finish_reason in ("tool_calls", "length")
    for seed in range(3):
        sampled = ask(client, CIRCLES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed,
                      max_tokens=100)
        assert [name for name, _ in calls_of(sampled)][0] in ("report_shape", "look_again")


def test_auto_and_none_answer_in_text_as_the_model_does_and_auto_takes_no_structure_from_tools(client):
    plain = ask(client, CIRCLES).choices[0]
    for choice in ("auto", "none", None):
        answer = ask(client, CIRCLES, tools=TOOLS, **({} if choice is None else {"tool_choice": choice})).choices[0]
        assert (answer.message.content, answer.finish_reason, answer.message.tool_calls) == (plain.message.content, "stop", None)
    # "auto" beside a response format: the answer is held to the format, as text
    held = ask(client, CIRCLES, tools=TOOLS, tool_choice="auto", response_format={"type": "json_schema", "json_schema": {
        "name": "shape", "schema": SCHEMA}}).choices[0]
    assert held.message.tool_calls is None and follows_schema(held.message.content)


def test_streamed_calls_add_up_to_the_whole_answers(client):
    for options in ({"tool_choice": NAMED}, {"tool_choice": "required", "parallel_tool_calls": False},
                    {"tool_choice": "required"}, {"tool_choice": "auto"}, {"tool_choice": NAMED, "max_tokens": 4}):
        whole = ask(client, CIRCLES, tools=TOOLS, **{"max_tokens": 60, **options}).choices[0]
        streamed = final_of_stream(client, messages=CIRCLES, tools=TOOLS, **options).choices[0]
        assert streamed.finish_reason == whole.finish_reason, options
        assert streamed.message.content == whole.message.content
        made = lambda message: [(call.function.name, call.function.arguments) for call in message.tool_calls or []]  # noqa: E731
        assert made(streamed.message) == made(whole.message), options
    # chunk by chunk: a named call's name comes first, alone; its arguments follow as they grow
    chunks = list(client.chat.completions.create(model=MODEL, messages=CIRCLES, tools=TOOLS, tool_choice=NAMED, temperature=0,
                                                 max_tokens=60, stream=True))
    opening = chunks[0].choices[0].delta
    assert opening.role == "assistant" and opening.tool_calls[0].function.name == "report_shape"
    assert opening.tool_calls[0].function.arguments == "" and opening.tool_calls[0].id.startswith("call_")
    pieces = [chunk.choices[0].delta.tool_calls[0].function.arguments for chunk in chunks[1:] if chunk.choices[0].delta.tool_calls]
    assert len(pieces) > 1 and all(chunk.choices[0].delta.tool_calls[0].id is None for chunk in chunks[1:]
                                   if chunk.choices[0].delta.tool_calls)


def test_n_choices_each_make_their_own_call_and_usage_counts_them_all(client):
    answer = ask(client, CIRCLES, tools=TOOLS, tool_choice=NAMED, n=3, temperature=1.0, seed=5, max_tokens=60)
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    for choice in answer.choices:
        follows_schema(choice.message.tool_calls[0].function.arguments)
    alone = [ask(client, CIRCLES, tools=TOOLS, tool_choice=NAMED, temperature=1.0, seed=5 + index, max_tokens=60)
             for index in range(3)]  # choice j draws with the seed + j
    assert [choice.message.tool_calls[0].function.arguments for choice in answer.choices] == \
        [each.choices[0].message.tool_calls[0].function.arguments for each in alone]
    assert answer.usage.completion_tokens == sum(each.usage.completion_tokens for each in alone)


def test_a_conversation_carries_its_calls_and_their_results(client, engine):
    call = ask(client, CIRCLES, tools=TOOLS, tool_choice=NAMED, max_tokens=60).choices[0].message
    history = CIRCLES + [call.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.tool_calls[0].id, "content": "recorded"},
                         {"role": "user", "content": "What color is the square?"}]
    answer = ask(client, history, tools=TOOLS)
    assert answer.choices[0].message.content and answer.usage.prompt_tokens_details.cached_tokens > 0  # the image's turn reused
    # what the model reads: the call in its assistant turn, in the layout it writes calls in; the result in a user turn
    request = parse_request(json.dumps({"model": MODEL, "messages": history}).encode())
    messages, images = engine_messages(request, MediaPolicy())
    arguments = json.loads(call.tool_calls[0].function.arguments)
    assert [message["role"] for message in messages] == ["user", "assistant", "user"] and len(images) == 1
    assert json.loads(messages[1]["content"]) == [{"name": "report_shape", "parameters": arguments}]
    texts = messages[2]["content"].split("\n")  # the result and the question, one user turn
    assert texts[0] == json.dumps({"name": "report_shape", "content": "recorded"}) and texts[-1] == "What color is the square?"
    # an assistant's text beside its calls is kept, before them
    spoken = [{**history[1], "content": "Let me report it."}] + history[2:]
    messages, _ = engine_messages(parse_request(json.dumps({"model": MODEL, "messages": CIRCLES + spoken}).encode()), MediaPolicy())
    assert messages[1]["content"].split("\n")[0] == "Let me report it."
    # arguments that are no JSON object (a call cut off at its limit, which LangChain sends back) are kept as text:
    # an agent's next request does not fail for its last answer
    cut = ask(client, CIRCLES, tools=TOOLS, tool_choice=NAMED, max_tokens=4).choices[0].message
    for arguments in (cut.tool_calls[0].function.arguments, "[1]", '{"a": ' + "[" * 5_000 + "]" * 5_000 + "}"):
        broken = {**history[1], "tool_calls": [{**history[1]["tool_calls"][0], "function": {"name": "report_shape", "arguments": arguments}}]}
        request = parse_request(json.dumps({"model": MODEL, "messages": CIRCLES + [broken] + history[2:]}).encode())
        assert json.loads(engine_messages(request, MediaPolicy())[0][1]["content"]) == [{"name": "report_shape", "arguments": arguments}]
    assert ask(client, CIRCLES + [{**history[1], "tool_calls": [{**history[1]["tool_calls"][0], "function": {
        "name": "report_shape", "arguments": cut.tool_calls[0].function.arguments}}]}] + history[2:], tools=TOOLS).choices[0].message.content


def test_what_cannot_be_answered_is_a_400_naming_its_field(client):
    call = {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                 "function": {"name": "report_shape", "arguments": "{\"color\": "}}]}
    cases = [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "paint"}}}, "tool_choice.function.name", "'paint'"),
        ({"tools": [REPORT, REPORT]}, "tools.1.function.name", "given twice"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name", "pattern"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools.0.function.parameters", "type object"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type", "function"),
        ({"tools": TOOLS, "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "tools", "give one"),
        ({"tools": TOOLS, "tool_choice": "required", "min_tokens": 3}, "min_tokens", "structured output"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "integer"}}, "not": {"required": ["a"]}}}}], "tool_choice": "required"},
         "tools", "uses not"),
        ({"tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {
            "a": {"$ref": "#/$defs/A"}}, "$defs": {"A": {"type": kind}}}}} for name, kind in (("f", "integer"), ("g", "string"))],
          "tool_choice": "required"}, "tools.1.function.parameters", "differs"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "a": {"$ref": "#/properties/b"}, "b": {"type": "integer"}}}}}], "tool_choice": "required"},
         "tools.0.function.parameters", "points into its own schema"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "$defs": [1]}}}],
          "tool_choice": "required"}, "tools.0.function.parameters", "$defs is an object"),
        ({"tools": [{"type": "function", "function": {"name": f"f{index}", "parameters": {"type": "object", "properties": {
            "a": {"type": "string", "description": "x" * 1000}}}}} for index in range(100)], "tool_choice": "required"},
         "tools", "characters together"),  # refused before a copy of each is made
        ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}},
         "tool_choice.type", "function"),  # no class name of ours in the field
        ({"messages": CIRCLES + [{"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages.1.tool_call_id", "call_9"),
        ({"messages": CIRCLES + [call, {"role": "tool", "content": "x"}]}, "messages.2.tool_call_id", "names the call"),
        ({"messages": CIRCLES + [{**call, "tool_calls": [{**call["tool_calls"][0], "function": {"name": "f", "arguments": "1" * 70_000}}]}]},
         "messages.1.tool_calls", "70,000 characters"),
        ({"messages": CIRCLES + [{**call, "tool_calls": [call["tool_calls"][0]] * 5_000}]}, "messages", "tool calls"),
        ({"messages": CIRCLES + [{"role": "tool", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}],
                                  "tool_call_id": "x"}]}, "messages.1.content", "user messages"),
    ]
    for body, param, words in cases:
        body = {"messages": CIRCLES, **body}
        error = refused(lambda: client.chat.completions.create(model=MODEL, max_tokens=5, extra_body=body, messages=body.pop("messages")))
        assert error.status_code == 400, body
        assert error.body["param"] == param and words in error.body["message"], (param, error.body)
    # /v1/completions has no tools; OpenAI's former function calling is refused by name
    assert refused(lambda: complete(client, PROMPT, extra_body={"tools": TOOLS})).body["param"] == "tools"
    assert refused(lambda: ask(client, CIRCLES, extra_body={"functions": [{"name": "f"}]})).body["code"] == "unsupported_parameter"


def layout(plan: ToolPlan, texts: list[str], finish: str = "stop") -> tuple[list[dict], dict]:
    """The chunks a stream of `texts` (the answer's text as it grows) is sent as, and the whole answer of its last."""
    completion = ToolCallCompletion(plan, MODEL)
    progresses = [Progress(text, 10, 0, index + 1) for index, text in enumerate(texts)]
    progresses[-1].finish_reason = finish
    chunks, sent = [completion.opening(progresses[0])], ""
    for progress in progresses:
        if len(progress.text) > len(sent):
            chunks.append(completion.delta(progress.text[len(sent):], progress))
            sent = progress.text
        if progress.finish_reason:
            chunks += completion.ending(progress)
    return [chunk for chunk in chunks if chunk is not None], completion.whole(progresses[-1])


def accumulated(chunks: list[dict]):
    """The message the official client's accumulator makes of `chunks`."""
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    return state.current_completion_snapshot.choices[0]


@pytest.mark.parametrize("answer", ['[{"name": "report_shape", "parameters": {"color": "red", "count": 1}}, {"name": "look_again", "parameters": {}}]',
                                    ' {"name": "look_again", "arguments": {}}'])
def test_an_auto_answer_that_calls_tools_is_held_back_and_sent_as_calls(answer):
    """The shapes model never calls a tool of its own accord: an answer's layout is checked on the texts a model that
    does would send."""
    plan = ToolPlan.of(ChatRequest.model_validate({"model": MODEL, "messages": CIRCLES, "tools": TOOLS}).tools, "auto", None)
    texts = [answer[:end] for end in range(5, len(answer), 7)] + [answer]
    chunks, whole = layout(plan, texts)
    assert not any(chunk["choices"][0]["delta"].get("content") for chunk in chunks)  # nothing of it went out as text
    choice = accumulated(chunks)
    made = [(call.function.name, json.loads(call.function.arguments)) for call in choice.message.tool_calls]
    expected = json.loads(answer)
    expected = [(item["name"], item.get("parameters", item.get("arguments"))) for item in (expected if isinstance(expected, list) else [expected])]
    assert made == expected and choice.finish_reason == "tool_calls"
    assert [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in whole["choices"][0]["message"]["tool_calls"]] == expected


@pytest.mark.parametrize("answer", ['{"color": "red"}', '[1, 2]', '[{"name": "paint", "parameters": {}}]', 'The circle is red.',
                                    '[{"name": "look_again", "parameters": {}}', "[" * 3_000, '[{"name": ["look_again"]}]'])
def test_an_auto_answer_that_is_no_call_goes_out_as_its_text(answer):
    """Also what no JSON parser takes (nested past its limit) and names that are no name."""
    plan = ToolPlan.of(ChatRequest.model_validate({"model": MODEL, "messages": CIRCLES, "tools": TOOLS}).tools, "auto", None)
    chunks, whole = layout(plan, [answer[:end] for end in range(3, len(answer), 4)] + [answer])
    choice = accumulated(chunks)
    assert choice.message.content == answer and not choice.message.tool_calls and choice.finish_reason == "stop"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": answer}


def test_auto_without_parallel_calls_takes_the_first_and_a_lists_reader_finds_each_call_once():
    tools = ChatRequest.model_validate({"model": MODEL, "messages": CIRCLES, "tools": TOOLS}).tools
    two = '[{"name": "look_again", "parameters": {}}, {"name": "report_shape", "parameters": {"color": "red", "count": 1}}]'
    calls, finish = ToolPlan.of(tools, "auto", False).answer(two, "stop")
    assert [call["function"]["name"] for call in calls] == ["look_again"] and finish == "tool_calls"
    assert len(ToolPlan.of(tools, "auto", None).answer(two, "stop")[0]) == 2
    # read as it grows, a character at a time: each object once, when its closing brace arrives, and the list closed
    reader, found = ListReader(), []
    for end in range(1, len(two) + 1):
        new = reader.read(two[:end])
        assert all(two[:end].endswith("}") for _ in new)
        found += new
    assert found == json.loads(two) and reader.closed
