"""OpenAI's chat-completions and completions formats, the asking side: each request as a typed model, checked, its
messages in the engine's form, and the error object. The answers' objects are openai_responses.py's; no HTTP here
(that is server.py)."""

import re
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, ValidationError
from pydantic_core import from_json, to_json

from .decoding import MAX_LOGPROBS, MAX_REPETITION_PENALTY, MIN_REPETITION_PENALTY, Sampling
from .media import MediaPolicy, image_bytes
from .penalties import bad_word_ids
from .prompts import template_flags
from .structured_output import Structure, StructureError, check, check_size
from .tool_calls import MAX_TOOLS, Tool, ToolCall, ToolChoice, ToolError, ToolPlan, calls_text, result_text
from .untrusted import MAX_CONVERSATION_CHARS, MESSAGE_OVERHEAD

DEFAULT_MAX_TOKENS = 512


class APIError(Exception):
    """Answered as OpenAI's error object `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool's: the call whose result it is


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk has its choice's usage so far


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str | None = None  # OpenAI's requires one; it names the schema, nothing more here
    schema_: dict | None = Field(None, alias="schema")  # none: any JSON object
    strict: bool | None = None  # an answer is held to its schema either way


class ResponseFormat(BaseModel):
    """OpenAI's: plain text (the default), any JSON object, or JSON following `json_schema.schema`; vLLM's
    structural tag (`format`, xgrammar's; or its earlier `structures` and `triggers`)."""
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JSONSchemaFormat | None = None
    format: dict | None = None
    structures: list | None = None
    triggers: list | None = None


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (which its `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`
    fields were before): one of json (a schema), regex, choice, grammar (EBNF) or json_object."""
    model_config = ConfigDict(extra="forbid")  # whitespace_pattern ...: refused by name, not ignored
    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's default is any whitespace in JSON, which small models fill without end; here it is json.dumps' layout
    # unless this is false
    disable_any_whitespace: bool | None = None
    disable_fallback: bool | None = None  # there is one backend here: nothing to fall back from
    disable_additional_properties: bool | None = None  # what a schema does not name is refused already
    structural_tag: str | None = None  # vLLM's: a structural tag as JSON text (structured_output.tag_format)


# a top_k past int64 made the batched sampling's tensor overflow on the scheduler's thread, failing every answer
MAX_TOP_K = 2**31 - 1
MAX_CHOICES = 64  # in one request (n per prompt, times the prompts): each takes a place in the batch
MAX_LOGIT_BIAS = 1024  # tokens in one logit_bias (OpenAI takes 300)
MAX_TEMPLATE_KWARGS = 64  # keys of one chat_template_kwargs
MAX_STOP_TOKEN_IDS = 1024  # in one stop_token_ids: a set each decode step looks a token up in
MAX_CACHE_SALT = 256  # characters of one cache_salt
MAX_ALLOWED_TOKEN_IDS = 32_768  # in one allowed_token_ids: each choice carries them to the engine, which makes a mask of them
MAX_BAD_WORDS, MAX_BAD_WORD_CHARS = 128, 1_000  # each is looked for at the answer's end at every step


class SamplingRequest(BaseModel):
    """The fields both completion APIs share. Others are kept (`model_extra`) for `refuse_unsupported`: those that
    ask for what this server does not do are refused by name; the rest (user, metadata, store, ...) change nothing
    and are ignored."""
    model_config = ConfigDict(extra="allow")
    default_max_tokens: ClassVar[int] = DEFAULT_MAX_TOKENS
    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**63)  # what a torch generator takes
    # vLLM's and SGLang's sampling extras, which their clients send in extra_body (SGLang's benchmark sends
    # ignore_eos: true by default); top_k -1 or 0 is no limit, as theirs
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    return_tokens_as_token_ids: bool | None = None  # vLLM's: logprobs name tokens "token_id:N"
    return_token_ids: StrictBool | None = None  # vLLM's: the prompt's and each choice's token ids in the response
    prompt_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # vLLM's: the prompt tokens' and this many alternatives'
    # vLLM's: only the prompt's last this many tokens are read (-1: as many as the context holds)
    truncate_prompt_tokens: StrictInt | None = Field(None, ge=-1)
    # vLLM's: token ids that end the answer as the end token does (also with ignore_eos), and whether the stop
    # string or token that ended it stays in its text; whether special tokens' text is left out of it
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    include_stop_str_in_output: StrictBool | None = None
    skip_special_tokens: StrictBool | None = None
    # vLLM's: the only tokens the answer may have, and words it may not say (engine.penalties)
    allowed_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = Field(None, min_length=1, max_length=MAX_ALLOWED_TOKEN_IDS)
    bad_words: list[Annotated[str, Field(min_length=1, max_length=MAX_BAD_WORD_CHARS)]] | None = Field(None, max_length=MAX_BAD_WORDS)
    # vLLM's: requests share cached prefixes only with requests of the same salt (engine.prefix_cache); never logged
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_CACHE_SALT)
    n: StrictInt | None = Field(None, ge=1, le=MAX_CHOICES)  # choices per prompt, each an answer of its own
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)  # vLLM's
    # token id (as text) -> bias; strict, as n and seed: true or "50" is a client's mistake
    logit_bias: dict[str, StrictFloat | StrictInt] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    stream: bool | None = False  # null: not streamed, as for every other field a client may send null for
    stream_options: StreamOptions | None = None
    # a structured output (engine.structured_output): OpenAI's, vLLM's (and its former guided_* fields), SGLang's
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    _structure: tuple[str, Structure] | None = PrivateAttr(None)  # (the field that asked, what) once checked
    _bad_words: tuple[tuple[int, ...], ...] | None = PrivateAttr(None)  # bad_word_sequences'

    @property
    def structure(self) -> tuple[str, Structure] | None:
        """The structured output asked for, and the field that asked (set by `_checked`)."""
        return self._structure

    def asked_structures(self) -> list[tuple[str, Structure]]:
        """Every structured output the request asks for, each with its field (more than one is the client's mistake)."""
        outputs = self.structured_outputs or StructuredOutputs()
        compact = outputs.disable_any_whitespace is not False
        asked = []

        def schema(param: str, value: dict | str | None):
            if value is not None:
                text = value if isinstance(value, str) else to_json(value).decode()
                asked.append((param, Structure("json_schema", text, any_whitespace=not compact)))

        if self.response_format is not None and self.response_format.type == "structural_tag":
            given = self.response_format.model_dump(include={"format", "structures", "triggers"}, exclude_none=True)
            asked.append(("response_format", Structure("structural_tag", to_json(given).decode())))
        elif self.response_format is not None and self.response_format.type != "text":
            inner = self.response_format.json_schema
            if self.response_format.type == "json_schema" and inner is not None and inner.schema_ is not None:
                schema("response_format", inner.schema_)
            else:  # json_object, or a json_schema of no schema (refused by _checked)
                asked.append(("response_format", Structure("json_object", any_whitespace=not compact)))
        schema("structured_outputs.json", outputs.json_)
        schema("guided_json", self.guided_json)
        if outputs.json_object:
            asked.append(("structured_outputs.json_object", Structure("json_object", any_whitespace=not compact)))
        for param, kind, value in [("structured_outputs.regex", "regex", outputs.regex), ("guided_regex", "regex", self.guided_regex),
                                   ("regex", "regex", self.regex), ("structured_outputs.grammar", "grammar", outputs.grammar),
                                   ("guided_grammar", "grammar", self.guided_grammar), ("ebnf", "grammar", self.ebnf)]:
            if value is not None:
                asked.append((param, Structure(kind, value)))
        for param, value in [("structured_outputs.choice", outputs.choice), ("guided_choice", self.guided_choice)]:
            if value is not None:
                asked.append((param, Structure("choice", to_json(value).decode())))
        if outputs.structural_tag is not None:
            asked.append(("structured_outputs.structural_tag", Structure("structural_tag", outputs.structural_tag)))
        return asked

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stop for stop in stops if stop)

    @property
    def wanted_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def most_tokens(self) -> int:
        """The answer's most tokens as asked (before the server's limit)."""
        return self.default_max_tokens if self.wanted_tokens is None else self.wanted_tokens

    @property
    def logprob_alternatives(self) -> int | None:
        """How many alternatives each generated token's log-probability comes with; None: none asked for."""
        return None

    @property
    def prompt_logprob_alternatives(self) -> int | None:
        """How many alternatives each prompt token's log-probability comes with (vLLM's prompt_logprobs); None: none
        asked for."""
        return self.prompt_logprobs

    @property
    def choices(self) -> int:
        """Choices per prompt (`n`)."""
        return self.n or 1

    def bad_word_sequences(self, tokenizer) -> tuple[tuple[int, ...], ...]:
        """bad_words' token sequences (penalties.bad_word_ids), made once per request however many choices it has."""
        if self._bad_words is None:
            self._bad_words = bad_word_ids(tokenizer, self.bad_words or [])
        return self._bad_words

    def sampling(self, max_tokens: int, choice: int = 0) -> Sampling:
        """`max_tokens`: the server's limit, which caps min_tokens too. Choice j of n draws with the seed + j (each
        answer draws from a generator of its own: one seed would give n equal answers)."""
        most = min(self.most_tokens, max_tokens)
        seed = None if self.seed is None else (self.seed + choice + 2**63) % 2**64 - 2**63  # within int64
        # "5" and "0005" are one token: the later one counts, as in a dict keyed by id
        bias = tuple({int(token): float(value) for token, value in (self.logit_bias or {}).items()}.items())
        return Sampling(temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p, max_new_tokens=most, seed=seed,
                        top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0, min_tokens=min(self.min_tokens or 0, most),
                        ignore_eos=bool(self.ignore_eos), logprobs=self.logprob_alternatives,
                        prompt_logprobs=self.prompt_logprob_alternatives, frequency_penalty=self.frequency_penalty or 0.0,
                        presence_penalty=self.presence_penalty or 0.0,
                        repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty, logit_bias=bias,
                        structure=self.structure[1] if self.structure else None,
                        stop_token_ids=tuple(dict.fromkeys(self.stop_token_ids or [])),
                        include_stop_str_in_output=bool(self.include_stop_str_in_output),
                        skip_special_tokens=self.skip_special_tokens is not False, return_token_ids=bool(self.return_token_ids),
                        allowed_token_ids=None if self.allowed_token_ids is None else tuple(dict.fromkeys(self.allowed_token_ids)))


class Rendering(BaseModel):
    """vLLM's fields of a conversation's rendering: the assistant's turn opened after it (add_generation_prompt, true
    by default) or its last message continued as it is (continue_final_message). chat_template_kwargs'
    add_generation_prompt and continue_final_message count over those fields, as in vLLM; its other keys reach the
    template where the template reads them (engine.prompts.Prompter.template_arguments)."""
    add_generation_prompt: StrictBool | None = None
    continue_final_message: StrictBool | None = None
    chat_template_kwargs: dict | None = Field(None, max_length=MAX_TEMPLATE_KWARGS)

    @property
    def rendering(self) -> dict:
        """The chat template's arguments as the client gave them (Prompter.template_arguments reads them, its
        defaults engine.prompts.template_flags'): chat_template_kwargs over the two fields, as vLLM's."""
        fields = {"add_generation_prompt": self.add_generation_prompt, "continue_final_message": self.continue_final_message}
        return {**{key: value for key, value in fields.items() if value is not None}, **(self.chat_template_kwargs or {})}



class ChatRequest(SamplingRequest, Rendering):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: StrictBool | None = None  # strict, as the next two: 1, "true" or a count here is a client's mistake
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    echo: StrictBool | None = None  # vLLM's: a last message of the assistant's begins the answer's text
    _tool_plan: ToolPlan | None = PrivateAttr(None)

    @property
    def response_role(self) -> str:
        """The answer's role, as vLLM's: the assistant's after an opened turn, else the last message's (whose turn
        the answer continues)."""
        opened, _ = template_flags(self.rendering)
        return "assistant" if opened else self.messages[-1].role

    @property
    def echoed(self) -> str:
        """What an answer's text begins with: with `echo`, the last message's text if it has the answer's role (as
        vLLM's), else nothing."""
        last = self.messages[-1]
        if not self.echo or last.role != self.response_role:
            return ""
        content = last.content or ""
        return content if isinstance(content, str) else "\n".join(part.text for part in content if isinstance(part, TextPart))

    @property
    def tool_plan(self) -> ToolPlan | None:
        """How the answer calls tools (engine.tool_calls), set by `_checked`; None: it answers in text."""
        return self._tool_plan

    def asked_structures(self) -> list[tuple[str, Structure]]:
        asked = super().asked_structures()
        if self.tool_plan is not None and (structure := self.tool_plan.structure) is not None:
            asked.append(("tools", structure))
        return asked

    @property
    def wanted_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    """/v1/completions: `prompt` continued as it is: text or token ids, or a list of several (lm-eval's
    local-completions sends its batch so), each answered as a choice of its own. max_tokens defaults to 16, as
    OpenAI's and vLLM's do."""
    default_max_tokens: ClassVar[int] = 16
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt scored, nothing generated
    best_of: StrictInt | None = None  # only as many as n: the best of more is not chosen here
    # a count here (0 still asks for the chosen token's); with echo, the prompt's tokens' too (lm-eval's
    # loglikelihood and multiple-choice tasks send logprobs 1, echo true, max_tokens 1)
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)  # false or true here is a chat client's habit
    echo: StrictBool | None = None
    add_special_tokens: StrictBool | None = None  # vLLM's: false tokenizes a text prompt without the start token

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprob_alternatives(self) -> int | None:
        """The echo's count (see `_checked`: prompt_logprobs may not ask for another), else vLLM's prompt_logprobs."""
        echoed = self.logprobs if self.echo else None
        return echoed if echoed is not None else self.prompt_logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        """One prompt (text or token ids) per choice."""
        several = isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int)
        return list(self.prompt) if several else [self.prompt]


# Parameters this server does not implement -> the values that ask for nothing (what a client may send by habit).
# Anything else is refused by name rather than ignored: a client that asked for beam search or a token whitelist
# must not take a plain answer for what it asked.
NEUTRAL = {
    "functions": (None, []), "function_call": (None, "none"), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "web_search_options": (None,),
    # the extras of vLLM and SGLang that are not implemented
    "guided_whitespace_pattern": (None,), "structural_tag": (None,),
    "use_beam_search": (None, False), "length_penalty": (None, 1.0),
    "spaces_between_special_tokens": (None, True), "logits_processors": (None, []),
    "prompt_embeds": (None,), "mm_processor_kwargs": (None, {}),
    "kv_transfer_params": (None,), "vllm_xargs": (None, {}), "priority": (None, 0),
}
# why each of these is refused
REFUSED_BECAUSE = {"functions": "OpenAI's former function calling: send tools and tool_choice",
                   "function_call": "OpenAI's former function calling: send tools and tool_choice",
                   "tools": "tools are called on /v1/chat/completions", "tool_choice": "tools are called on /v1/chat/completions",
                   "use_beam_search": "each answer is sampled on its own; there is no beam search",
                   "chat_template": "a template sent with a request would run the client's code on the server; the model's "
                                    "own template renders every conversation",
                   "add_special_tokens": "a conversation is tokenized as the model's template renders it, with the special "
                                         "tokens its tokenizer adds; more on top is not a prompt the model was trained on",
                   "priority": "requests are served in the order they come"}
# /v1/chat/completions' own: vLLM's fields of a conversation's rendering that are not implemented
# (add_special_tokens false, vLLM's default for a chat: nothing added past what the rendering makes)
CHAT_NEUTRAL = {**NEUTRAL, "chat_template": (None,), "documents": (None, []), "add_special_tokens": (None, False)}
# /v1/completions' own (tools, tool_choice: fields of a chat request only)
COMPLETION_NEUTRAL = {"tools": (None, []), "tool_choice": (None, "none"), **NEUTRAL, "suffix": (None, "")}
# OpenAI takes 4 stop strings and vLLM any number; lm-eval's local-completions sends a task's whole `until` list and
# the end-of-text string (5 and more for some tasks). Each costs a search of the answer's tail per arrival.
MAX_STOPS, MAX_STOP_CHARS = 16, 1_000
MAX_PROMPT_TOKENS = MAX_CONVERSATION_CHARS  # token ids in a completion's prompt: no more than the characters of a text one
MAX_PROMPTS = 64  # in one /v1/completions request; each takes a place in the batch as a request of its own would
# Messages and content parts of one request together: each costs the chat template MESSAGE_OVERHEAD characters at
# least, so more could never fit the conversation's limit. Counted before the body becomes typed objects: a 30 MB
# body of a million empty text parts took 5 s and 1.9 GB to validate.
MAX_ITEMS = MAX_CONVERSATION_CHARS // MESSAGE_OVERHEAD


def parse_request(body: bytes) -> ChatRequest:
    """A /v1/chat/completions body, checked; APIError (400) that names what is wrong."""
    raw = _json(body)
    refuse_too_many_items(raw)
    return _checked(_validated(ChatRequest, raw), CHAT_NEUTRAL)


def parse_completion_request(body: bytes) -> CompletionRequest:
    """A /v1/completions body, checked; APIError (400) that names what is wrong."""
    raw = _json(body)
    prompt = raw.get("prompt") if isinstance(raw, dict) else None
    if isinstance(prompt, list):  # before a million ids, or prompts, become typed objects
        several = bool(prompt) and all(isinstance(item, (str, list)) for item in prompt)
        if several and len(prompt) > MAX_PROMPTS:
            raise APIError(400, f"prompt: {len(prompt):,} prompts in one request; at most {MAX_PROMPTS}", param="prompt")
        for index, tokens in enumerate(prompt if several else [prompt]):
            if isinstance(tokens, list) and len(tokens) > MAX_PROMPT_TOKENS:
                where = f"prompt.{index}" if several else "prompt"
                raise APIError(400, f"{where}: {len(tokens):,} token ids; at most {MAX_PROMPT_TOKENS:,}", param="prompt")
    request = _checked(_validated(CompletionRequest, raw), COMPLETION_NEUTRAL)
    if (count := len(request.prompts) * request.choices) > MAX_CHOICES:
        raise APIError(400, f"n: {len(request.prompts)} prompts of {request.choices} choices are {count} answers; at most "
                       f"{MAX_CHOICES} in one request", param="n")
    return request


def _json(body: bytes):
    try:
        return from_json(body)
    except ValueError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None


def _validated(kind: type[SamplingRequest], raw):
    try:
        return kind.model_validate(raw)
    except ValidationError as error:
        # the deepest error is the telling one: of content's string-or-parts union, the part's, not "not a string"
        first = max(error.errors(), key=lambda found: len(found["loc"]))
        loc = [part for part in first["loc"] if not _union_branch(part)]
        where = ".".join(str(part) for index, part in enumerate(loc) if loc[index + 1: index + 2] != [part]) or None
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None


def _checked(request: SamplingRequest, neutral: dict):
    refuse_unsupported(request, neutral)
    if isinstance(request, ChatRequest):
        try:
            request._tool_plan = ToolPlan.of(request.tools, request.tool_choice, request.parallel_tool_calls)
        except ToolError as error:
            raise APIError(400, str(error), param=error.param) from None
    if request.response_format is not None and request.response_format.type == "json_schema" and request.response_format.json_schema is None:
        raise APIError(400, "response_format: a json_schema response format needs its json_schema ({\"name\", \"schema\"})",
                       param="response_format.json_schema")
    if len(asked := request.asked_structures()) > 1:
        raise APIError(400, f"{asked[0][0]} and {asked[1][0]} both ask for a structured output; give one", param=asked[1][0])
    if asked:
        param, structure = asked[0]
        try:
            check_size(structure)  # its grammar is checked in a worker thread (`checked_structure`)
        except StructureError as error:
            raise APIError(400, f"{param}: {error}", param=param) from None
        if request.min_tokens:
            raise APIError(400, f"min_tokens: cannot be combined with a structured output ({param}), which ends where its "
                           "grammar does", param="min_tokens")
        request._structure = asked[0]
        if isinstance(request, ChatRequest) and request.tool_plan is not None and request.tool_plan.mode == "auto":
            request._tool_plan = None  # its answer is held to the structure asked: its text, no call
    if len(request.stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop strings", param="stop")
    if any(len(stop) > MAX_STOP_CHARS for stop in request.stops):
        raise APIError(400, f"stop: a stop string is at most {MAX_STOP_CHARS:,} characters", param="stop")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    if (request.min_tokens or 0) > (most := request.most_tokens):
        raise APIError(400, f"min_tokens: {request.min_tokens} is more than the answer's most tokens ({most})", param="min_tokens")
    if not_ids := [key for key in request.logit_bias or {} if not re.fullmatch(r"[0-9]{1,12}", key)]:
        raise APIError(400, f"logit_bias: the key {not_ids[0][:40]!r} is not a token id", param="logit_bias")
    if any(not -100 <= bias <= 100 for bias in (request.logit_bias or {}).values()):
        raise APIError(400, "logit_bias: each bias is between -100 and 100", param="logit_bias")
    if isinstance(request, ChatRequest) and request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs to be true", param="top_logprobs")
    if isinstance(request, CompletionRequest) and request.best_of not in (None, request.choices):
        raise APIError(400, f"best_of: not supported by this server other than equal to n ({request.choices}): it does not "
                       "choose the best of more answers", param="best_of", code="unsupported_parameter")
    if isinstance(request, CompletionRequest) and request.max_tokens == 0 and not request.echo:
        raise APIError(400, "max_tokens: 0 asks for nothing but the prompt's echo; give echo true, or at least 1", param="max_tokens")
    if (isinstance(request, CompletionRequest) and request.echo and request.logprobs is not None
            and request.prompt_logprobs not in (None, request.logprobs)):
        raise APIError(400, f"prompt_logprobs: echo with logprobs asks for the prompt's already, with {request.logprobs} "
                       "alternatives each; ask for that many here too", param="prompt_logprobs")
    if request.truncate_prompt_tokens == 0:
        raise APIError(400, "truncate_prompt_tokens: keep at least 1 of the prompt's tokens, or -1 for as many as the "
                       "context holds", param="truncate_prompt_tokens")
    if isinstance(request, ChatRequest):
        _check_rendering(request)
    return request


class TokenizeRequest(Rendering):
    """vLLM's /tokenize: a text `prompt` (with the tokenizer's start token unless add_special_tokens is false), or a
    conversation's `messages` rendered as /v1/chat/completions renders them (its images' tokens laid out)."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = Field(None, max_length=MAX_CONVERSATION_CHARS)
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: StrictBool | None = None
    return_token_strs: StrictBool | None = None


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[StrictInt] = Field(max_length=MAX_PROMPT_TOKENS)


TOKENIZE_NEUTRAL = {"chat_template": (None,), "tools": (None, []), "documents": (None, []), "mm_processor_kwargs": (None, {})}


def parse_tokenize_request(body: bytes) -> TokenizeRequest:
    """A /tokenize body, checked; APIError (400) that names what is wrong."""
    raw = _json(body)
    refuse_too_many_items(raw)
    request = _validated(TokenizeRequest, raw)
    refuse_unsupported(request, TOKENIZE_NEUTRAL)
    if (request.prompt is None) == (request.messages is None):
        raise APIError(400, "prompt: give a text prompt or a conversation's messages, one of them", param="prompt")
    if request.messages is not None and request.add_special_tokens:
        raise APIError(400, "add_special_tokens: a conversation is tokenized as /v1/chat/completions tokenizes it, its "
                       "start token the tokenizer's already", param="add_special_tokens")
    _check_rendering(request)
    return request


def parse_detokenize_request(body: bytes) -> DetokenizeRequest:
    return _validated(DetokenizeRequest, _json(body))


def _check_rendering(request: Rendering):
    for key in ("add_generation_prompt", "continue_final_message"):
        if not isinstance(value := (request.chat_template_kwargs or {}).get(key, False), bool):
            raise APIError(400, f"chat_template_kwargs.{key}: {value!r:.40} is not a boolean", param=f"chat_template_kwargs.{key}")
    opened, continued = template_flags(request.rendering)
    if continued and opened:
        raise APIError(400, "continue_final_message: the last message is continued, or the assistant's next one begins "
                       "after it (add_generation_prompt, true by default): not both; send add_generation_prompt false",
                       param="continue_final_message")
    plan = getattr(request, "tool_plan", None)
    if getattr(request, "echo", None) and plan is not None and plan.mode in ("named", "required"):
        raise APIError(400, "echo: an answer that must call a tool has no text to begin with the last message; send "
                       "tool_choice auto or none", param="echo")
    if continued and plan is not None:
        raise APIError(400, "continue_final_message: a message continued is text, not a tool's call; send tool_choice none",
                       param="continue_final_message")


def checked_structure(request: SamplingRequest):
    """A 400 naming the field if the request's structured output gives no grammar; not on the event loop (see
    structured_output.check)."""
    if request.structure is not None:
        param, structure = request.structure
        try:
            check(structure)
        except StructureError as error:
            raise APIError(400, f"{param}: {error}", param=param) from None


def _union_branch(loc) -> bool:
    """pydantic's name of a union's branch in an error's location ("str", "list[...]"): no field of the request.
    (A tagged union's branch is its tag, which the location then repeats: `image_url.image_url.url`, dropped too.)"""
    # (a model's branch goes by its class's name: ChosenTool, never a field's)
    return isinstance(loc, str) and (loc in ("str", "int", "float", "bool", "none") or "[" in loc or loc[:1].isupper())


def refuse_too_many_items(raw):
    messages = raw.get("messages") if isinstance(raw, dict) else None
    if not isinstance(messages, list):
        return  # validation says what is wrong
    parts = sum(len(message[key]) for message in messages if isinstance(message, dict)
                for key in ("content", "tool_calls") if isinstance(message.get(key), list))
    if len(messages) + parts > MAX_ITEMS:
        raise APIError(400, f"messages: the conversation has {len(messages):,} messages and {parts:,} content parts and "
                       f"tool calls; at most {MAX_ITEMS:,} in all", param="messages")


def refuse_unsupported(request: SamplingRequest, neutral: dict):
    """A 400 for the first field of `neutral` (in its order: `tools` before `tool_choice`, which clients send first
    in alphabetical order) the request sets to anything but a neutral value."""
    extra = request.model_extra or {}
    for name, allowed in neutral.items():
        if name in extra and not any(_same(extra[name], value) for value in allowed):
            why = f" ({REFUSED_BECAUSE[name]})" if name in REFUSED_BECAUSE else ""
            raise APIError(400, f"{name}: not supported by this server{why}", param=name, code="unsupported_parameter")


def _same(value, neutral) -> bool:
    """JSON equality: 1 and 1.0 are the same number, but true is not 1."""
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def engine_messages(request: ChatRequest, policy: MediaPolicy) -> tuple[list[dict], list[bytes]]:
    """The conversation in chat-template form and its images' bytes, in the order they come (each becomes an image
    marker in its user turn), at most `policy.max_images` of them; none for a conversation of text only."""
    count = sum(isinstance(part, ImagePart) for message in request.messages if isinstance(message.content, list)
                for part in message.content)
    if count > policy.max_images:  # before a single one is fetched or decoded
        raise APIError(400, f"the request has {count} images; this server takes at most {policy.max_images} per request",
                       param="messages", code="too_many_images")
    messages, images, called = [], [], {}  # called: the history's tool calls, id -> the function's name
    for index, message in enumerate(request.messages):
        content = message.content or ""
        role = {"developer": "system", "tool": "user"}.get(message.role, message.role)  # a tool's result: see tool_calls
        if message.role == "assistant" and message.tool_calls or message.role == "tool":
            messages.append({"role": role, "content": _tool_turn(message, index, called)})
            continue
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        parts = []
        for part in content:
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
                continue
            where = f"messages.{index}.content"
            if role != "user":
                raise APIError(400, "images go in user messages", param=where)
            try:
                images.append(image_bytes(part.image_url.url, policy))
            except ValueError as error:
                raise APIError(getattr(error, "status", 400), str(error), param=where,
                               code="image_too_large" if getattr(error, "status", 400) == 413 else "invalid_image") from None
            parts.append({"type": "image"})
        # a system or assistant message's text parts joined as the template joins a user's: a line each
        messages.append({"role": role, "content": parts if role == "user" else "\n".join(part["text"] for part in parts)})
    return _merged(messages), images


def _tool_turn(message: Message, index: int, called: dict[str, str]) -> str:
    """The text of an assistant message that called tools (its text, then its calls), or of a tool's result;
    `called` gathers the calls' ids, which a result names."""
    where = f"messages.{index}"
    if isinstance(message.content, list) and any(isinstance(part, ImagePart) for part in message.content):
        raise APIError(400, "images go in user messages", param=f"{where}.content")
    text = message.content if isinstance(message.content, str) else "\n".join(part.text for part in message.content or [])
    if message.role == "tool":
        if message.tool_call_id is None:
            raise APIError(400, f"{where}.tool_call_id: a tool's message names the call it answers", param=f"{where}.tool_call_id")
        if message.tool_call_id not in called:
            raise APIError(400, f"{where}.tool_call_id: a tool's message answers a call an assistant message made before "
                           f"it; no call has the id {message.tool_call_id[:80]!r}", param=f"{where}.tool_call_id")
        return result_text(called[message.tool_call_id], text)
    if (size := sum(len(call.function.arguments) for call in message.tool_calls)) > MAX_CONVERSATION_CHARS:
        # before they are parsed: no conversation that holds them fits
        raise APIError(400, f"{where}.tool_calls: their arguments are {size:,} characters; a conversation holds at most "
                       f"{MAX_CONVERSATION_CHARS:,}", param=f"{where}.tool_calls")
    called.update((call.id, call.function.name) for call in message.tool_calls)
    return "\n".join(filter(None, [text, calls_text(message.tool_calls)]))


def _merged(messages: list[dict]) -> list[dict]:
    """Each run of messages of one role as one message, their texts a line apart as a message's parts are: OpenAI's
    API takes two user messages in a row (LangChain sends them for two HumanMessages, and two system messages for
    two SystemMessages), while LLaVA's prompt has one system text and alternates user and assistant turns."""
    def as_parts(content) -> list[dict]:
        return [{"type": "text", "text": content}] if isinstance(content, str) else content

    runs = []
    for message in messages:
        if not runs or runs[-1]["role"] != message["role"]:
            runs.append(message)
            continue
        before, content = runs[-1]["content"], message["content"]  # a user's: text or parts; the others': text
        joined = f"{before}\n{content}" if isinstance(before, str) and isinstance(content, str) else as_parts(before) + as_parts(content)
        runs[-1] = {**runs[-1], "content": joined}
    return runs
