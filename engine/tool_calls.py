"""Tool calling on /v1/chat/completions: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, the calls an
answer makes (whole, or streamed as OpenAI streams them), and the calls and results of a conversation's history as
the text the model reads.

What holds the model to a tool is a structured output (engine.structured_output), not its prompt: LLaVA's chat
template renders messages only and has no place for tool definitions, so they are not in the prompt, as with vLLM
serving a template without tools. A forced call (`tool_choice` naming a function) is decoded under the grammar of
that function's parameters, its arguments the answer's text; "required" under the grammar of a list of calls of the
tools given, `[{"name": ..., "parameters": {...}}, ...]` (vLLM's layout; one call only with parallel_tool_calls
false); "auto" decodes freely and takes an answer that is such a list, or one such object, naming tools given, as its
calls, and any other as its text; "none" answers in text. A call in the history is written in the same layout in its
assistant turn, and a tool's result as `{"name": ..., "content": ...}` in a user turn: what a model fine-tuned on
those layouts reads and writes."""

import copy
import functools
import json
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import to_json

from .answer_text import Progress
from .openai_responses import ChatCompletion
from .structured_output import MAX_SPEC_CHARS, Structure

MAX_TOOLS = 128  # in one request, as OpenAI's
NO_PARAMETERS = {"type": "object", "properties": {}}  # a function without `parameters` takes none: its arguments are {}


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
    description: str | None = None  # for the model, whose prompt has no place for it here (see the module's text)
    parameters: dict | None = None
    strict: bool | None = None  # arguments are held to the parameters either way


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(BaseModel):
    name: str


class ChosenTool(BaseModel):
    type: Literal["function"]
    function: ChosenFunction


ToolChoice = Literal["none", "auto", "required"] | ChosenTool


class CalledFunction(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI's


class ToolCall(BaseModel):
    """A call an assistant message of the history made."""
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ToolError(ValueError):
    """A request's tools, tool choice or tool messages that cannot be answered; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def new_call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": arguments}}


@dataclass(frozen=True)
class ToolPlan:
    """How a request's answer calls tools: `mode` "named" (the function `named`, forced), "required" (one call or
    more of `tools`; one at most unless `parallel`) or "auto" (the model's choice, read off its text)."""
    mode: str
    tools: dict[str, dict] = field(default_factory=dict)  # name -> its parameters' schema
    parallel: bool = True
    named: str | None = None

    @classmethod
    def of(cls, tools: list[Tool] | None, choice: ToolChoice | None, parallel: bool | None) -> "ToolPlan | None":
        """The plan of a request's fields (None: an answer in text); ToolError for what does not fit together."""
        tools = tools or []
        if choice is None:
            choice = "auto" if tools else "none"  # OpenAI's defaults
        if not tools:
            if choice != "none":
                raise ToolError("needs tools to choose from", "tool_choice")
            return None
        schemas = {}
        for index, tool in enumerate(tools):
            name, parameters = tool.function.name, tool.function.parameters
            if name in schemas:
                raise ToolError(f"the name {name!r} is given twice", f"tools.{index}.function.name")
            if parameters is not None and parameters.get("type", "object") != "object":
                raise ToolError(f"a function's parameters are a JSON schema of type object, not {parameters.get('type')!r}",
                                f"tools.{index}.function.parameters")
            schemas[name] = parameters or NO_PARAMETERS
        if choice == "none":
            return None
        parallel = parallel is not False  # OpenAI's default: as many calls as the model makes
        if isinstance(choice, ChosenTool):
            if choice.function.name not in schemas:
                raise ToolError(f"no tool of the request is named {choice.function.name!r}", "tool_choice.function.name")
            return cls("named", schemas, parallel, choice.function.name)
        plan = cls(choice, schemas, parallel)
        if choice == "required":
            plan.structure  # noqa: B018 (a $defs of two tools that differ: refused here, with the tool's field)
        return plan

    @functools.cached_property
    def structure(self) -> Structure | None:
        """What the answer is held to (none for "auto"): the named function's parameters, or a list of calls.
        Built once per request (checked, then compiled)."""
        if self.mode == "named":
            return Structure("json_schema", _dumps(self.tools[self.named]), any_whitespace=False)
        if self.mode != "required":
            return None
        # before a copy of each: the list's schema is at least their sum, and check_size refuses it past the limit
        # (13 MB of tools took 1.5 s of the event loop to copy and write out before that refusal)
        if (size := sum(len(to_json(parameters)) for parameters in self.tools.values())) > MAX_SPEC_CHARS:
            raise ToolError(f"the tools' parameters are {size:,} characters together; a list of calls of them is held by "
                            f"one grammar of at most {MAX_SPEC_CHARS:,}", "tools")
        defs, cases = {}, []
        for index, (name, parameters) in enumerate(self.tools.items()):
            parameters = copy.deepcopy(parameters)
            for key in ("$defs", "definitions"):  # a tool's own definitions, moved to the list's root its $refs name
                found = parameters.pop(key, None) or {}
                if not isinstance(found, dict):
                    raise ToolError(f"its {key} is an object of schemas by name", f"tools.{index}.function.parameters")
                for term, schema in found.items():
                    if defs.setdefault(key, {}).setdefault(term, schema) != schema:
                        raise ToolError(f"its {key} {term!r} differs from another tool's of that name, which one list of "
                                        "calls cannot hold both of", f"tools.{index}.function.parameters")
            if ref := _root_ref(parameters):
                raise ToolError(f"its $ref {ref[:80]!r} points into its own schema, which a list of calls of several tools "
                                "moves; point into its $defs", f"tools.{index}.function.parameters")
            cases.append({"type": "object", "properties": {"name": {"const": name}, "parameters": parameters},
                          "required": ["name", "parameters"]})
        schema = {"type": "array", "items": cases[0] if len(cases) == 1 else {"anyOf": cases}, "minItems": 1, **defs}
        if not self.parallel:
            schema["maxItems"] = 1
        return Structure("json_schema", _dumps(schema), any_whitespace=False)

    def answer(self, text: str, finish_reason: str) -> tuple[list[dict], str] | None:
        """The calls an answer's text makes and its finish reason (OpenAI's: "stop" for a named call, "tool_calls"
        for calls the model chose); None for an answer in text (also a forced list cut off before its first call)."""
        if self.mode == "named":
            return [new_call(self.named, text)], finish_reason
        if self.mode == "auto":
            made = calls_made(text, self.tools) if finish_reason == "stop" else None
            if made and not self.parallel:  # the first only, as OpenAI's and vLLM's
                made = made[:1]
            return ([new_call(name, arguments) for name, arguments in made], "tool_calls") if made else None
        reader = ListReader()
        items = reader.read(text)
        closed = reader.closed
        if not items:
            return None
        calls = [new_call(item["name"], _dumps(item["parameters"])) for item in items]
        return calls, "tool_calls" if closed and finish_reason == "stop" else finish_reason


def _root_ref(schema) -> str | None:
    """A $ref in `schema` that points anywhere but into its $defs or definitions."""
    if isinstance(schema, dict):
        if isinstance(ref := schema.get("$ref"), str) and not ref.startswith(("#/$defs/", "#/definitions/")) and ref.startswith("#"):
            return ref
        schema = list(schema.values())
    if isinstance(schema, list):
        return next((found for item in schema if (found := _root_ref(item))), None)
    return None


class ListReader:
    """Reads the objects of a JSON list as its text grows (`[{...}, {"na` has one complete), each once: a stream's
    text is read from after the last object found, not from its start at every chunk."""

    def __init__(self):
        self._decoder, self._at, self.found, self.closed = json.JSONDecoder(), None, 0, False

    def read(self, text: str) -> list[dict]:
        """The objects complete in `text` (the whole text so far) since the last read."""
        new = []
        if self._at is None:  # its opening bracket not read yet
            at = _blank(text, 0)
            if text[at: at + 1] != "[":
                return new
            self._at = at + 1
        while not self.closed:
            at = _blank(text, self._at)
            if text[at: at + 1] == "]":
                self.closed = True
                break
            if self.found + len(new):
                if text[at: at + 1] != ",":
                    break
                at = _blank(text, at + 1)
            try:
                item, at = self._decoder.raw_decode(text, at)
            except (ValueError, RecursionError):  # not complete yet (or nested past what Python parses)
                break
            if not isinstance(item, dict):
                break
            new.append(item)
            self._at = at
        self.found += len(new)
        return new


def _blank(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def calls_made(text: str, tools: dict) -> list[tuple[str, str]] | None:
    """(name, arguments as JSON text) of each call `text` makes, when all of it is a list of calls, or one call, of
    the tools given, {"name": ..., "parameters": {...}} ("arguments" too); else None."""
    try:
        found = json.loads(text)
    except (ValueError, RecursionError):  # the model's text: "[" five thousand times is no call either
        return None
    items = found if isinstance(found, list) else [found]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or item["name"] not in tools \
                or not set(item) <= {"name", "parameters", "arguments"}:
            return None
        arguments = item.get("parameters", item.get("arguments", {}))
        if not isinstance(arguments, dict):
            return None
        calls.append((item["name"], _dumps(arguments)))
    return calls or None


def calls_text(calls: list[ToolCall]) -> str:
    """An assistant turn's calls as the model writes them. Arguments that are no JSON object (a call cut off by its
    token limit, which LangChain sends back as it came) are kept as their text, under "arguments": OpenAI's API
    takes any, and an agent's next request must not fail for its last answer."""
    made = []
    for call in calls:
        text = call.function.arguments
        try:
            arguments = json.loads(text) if text.strip() else {}
        except (ValueError, RecursionError):
            arguments = None
        made.append({"name": call.function.name, "parameters": arguments} if isinstance(arguments, dict)
                    else {"name": call.function.name, "arguments": text})
    return _dumps(made)


def result_text(name: str, content: str) -> str:
    """A tool's result as the user turn that brings it to the model."""
    return _dumps({"name": name, "content": content})


@dataclass
class _Streamed:
    """What a stream has sent of one choice's calls: how many, the reader of a list's, and whether its text goes
    out as text (auto)."""
    calls: int = 0
    as_text: bool = False
    reader: ListReader = field(default_factory=ListReader)


class ToolCallCompletion(ChatCompletion):
    """A chat completion whose answers call tools as `plan` says: each choice's message carries `tool_calls` (its
    content null), or its text when the model chose none. Streamed: a named call's arguments go out as they grow;
    a list's calls each whole as soon as it is complete; an "auto" answer is held back while it could still be a
    call (it begins with "[" or "{"), and goes out as text from the moment it cannot."""

    def __init__(self, plan: ToolPlan, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self._streamed: dict[int, _Streamed] = {}

    def whole(self, *progresses: Progress) -> dict:
        response = super().whole(*progresses)
        for choice, progress in zip(response["choices"], progresses):
            if (answer := self.plan.answer(progress.text, progress.finish_reason)) is not None:
                choice["message"] = {"role": "assistant", "content": None, "tool_calls": answer[0]}
                choice["finish_reason"] = answer[1]
        return response

    def opening(self, progress: Progress, index: int = 0) -> dict | None:
        self._streamed[index] = _Streamed()
        if self.plan.mode == "auto":
            return super().opening(progress, index)
        delta = {"role": "assistant", "content": None}
        if self.plan.mode == "named":  # its name is known before its arguments begin
            self._streamed[index].calls = 1
            call = new_call(self.plan.named, "")
            delta["tool_calls"] = [{"index": 0, **call}]
        return self._chunk(delta, index=index, progress=progress, opening=True)

    def delta(self, text: str, progress: Progress, index: int = 0) -> dict | None:
        streamed = self._streamed[index]
        if self.plan.mode == "named":
            return self._chunk({"tool_calls": [{"index": 0, "function": {"arguments": text}}]}, index=index,
                               logprobs=self._stream_logprobs(progress, index), progress=progress)
        if self.plan.mode == "auto":
            if not streamed.as_text:
                start = progress.text.lstrip()[:1]
                if start in ("", "[", "{"):
                    return None  # it could be a call: held back (its tokens' log-probabilities go with what follows)
                streamed.as_text, text = True, progress.text  # what was held back goes out with it
            return super().delta(text, progress, index)
        if not (items := streamed.reader.read(progress.text)):
            return None
        return self._calls_chunk(items, progress, index)

    def ending(self, progress: Progress, index: int = 0) -> list[dict]:
        streamed = self._streamed[index]
        if self.plan.mode == "named" or streamed.as_text:
            return [super().ending(progress, index)]
        chunks, finish = [], progress.finish_reason
        if (answer := self.plan.answer(progress.text, finish)) is not None:
            calls, finish = answer
            if calls[streamed.calls:]:
                chunks.append(self._calls_chunk(calls[streamed.calls:], progress, index, made=True))
        elif progress.text:  # no call after all: its text, held back until now
            chunks.append(self._chunk({"content": progress.text}, index=index, logprobs=self._stream_logprobs(progress, index),
                                      progress=progress))
        chunks.append(self._chunk({}, finish, index, logprobs=self._stream_logprobs(progress, index, last=True), progress=progress))
        return chunks

    def _calls_chunk(self, items: list[dict], progress: Progress, index: int, made: bool = False) -> dict:
        """The chunk of calls complete since the last: `items` of the list, or calls `made` already."""
        streamed = self._streamed[index]
        calls = items if made else [new_call(item["name"], _dumps(item["parameters"])) for item in items]
        entries = [{"index": streamed.calls + offset, **call} for offset, call in enumerate(calls)]
        streamed.calls += len(calls)
        return self._chunk({"tool_calls": entries}, index=index, logprobs=self._stream_logprobs(progress, index), progress=progress)
