"""OpenAI's chat-completions format: the request as a typed model, its messages in the engine's form, and the
response, chunk and error objects. No HTTP here (that is server.py)."""

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import from_json

from .answer_text import Progress
from .decoding import Sampling
from .media import MediaPolicy, image_bytes
from .untrusted import MAX_CONVERSATION_CHARS, MESSAGE_OVERHEAD

DEFAULT_MAX_TOKENS = 512


class APIError(Exception):
    """Answered as OpenAI's error object `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

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
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields we honour. Others are kept (`model_extra`) for `refuse_unsupported`: those that ask for what this
    server does not do are refused by name; the rest (user, metadata, store, ...) change nothing and are ignored."""
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what a torch generator takes
    stream: bool | None = False  # null: not streamed, as for every other field a client may send null for
    stream_options: StreamOptions | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stop for stop in stops if stop)

    def sampling(self, max_tokens: int) -> Sampling:
        wanted = self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS
        return Sampling(temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p,
                        max_new_tokens=min(wanted, max_tokens), seed=self.seed)


# Parameters this server does not implement -> the values that ask for nothing (what a client may send by habit).
# Anything else is refused by name rather than ignored: a client that asked for JSON, tools or two choices must not
# take a plain single answer for what it asked. Penalties are refused, not implemented: sampling is the scheduler's.
NEUTRAL = {
    "n": (None, 1), "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "logprobs": (None, False), "top_logprobs": (None, 0),
    "logit_bias": (None, {}), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "web_search_options": (None,),
    # the sampling extras of vLLM and SGLang, which their clients send in extra_body
    "top_k": (None, 0, -1), "min_p": (None, 0), "repetition_penalty": (None, 1), "min_tokens": (None, 0),
    "ignore_eos": (None, False), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,),
}
MAX_STOPS, MAX_STOP_CHARS = 4, 1_000
# Messages and content parts of one request together: each costs the chat template MESSAGE_OVERHEAD characters at
# least, so more could never fit the conversation's limit. Counted before the body becomes typed objects: a 30 MB
# body of a million empty text parts took 5 s and 1.9 GB to validate.
MAX_ITEMS = MAX_CONVERSATION_CHARS // MESSAGE_OVERHEAD


def parse_request(body: bytes) -> ChatRequest:
    try:
        raw = from_json(body)
    except ValueError as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    refuse_too_many_items(raw)
    try:
        request = ChatRequest.model_validate(raw)
    except ValidationError as error:
        # the deepest error is the telling one: of content's string-or-parts union, the part's, not "not a string"
        first = max(error.errors(), key=lambda found: len(found["loc"]))
        loc = [part for part in first["loc"] if not _union_branch(part)]
        where = ".".join(str(part) for index, part in enumerate(loc) if loc[index + 1: index + 2] != [part]) or None
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None
    refuse_unsupported(request)
    if len(request.stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} stop strings", param="stop")
    if any(len(stop) > MAX_STOP_CHARS for stop in request.stops):
        raise APIError(400, f"stop: a stop string is at most {MAX_STOP_CHARS:,} characters", param="stop")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options: only allowed when stream is true", param="stream_options")
    return request


def _union_branch(loc) -> bool:
    """pydantic's name of a union's branch in an error's location ("str", "list[...]"): no field of the request.
    (A tagged union's branch is its tag, which the location then repeats: `image_url.image_url.url`, dropped too.)"""
    return isinstance(loc, str) and (loc in ("str", "int", "float", "bool", "none") or "[" in loc)


def refuse_too_many_items(raw):
    messages = raw.get("messages") if isinstance(raw, dict) else None
    if not isinstance(messages, list):
        return  # validation says what is wrong
    parts = sum(len(message["content"]) for message in messages
                if isinstance(message, dict) and isinstance(message.get("content"), list))
    if len(messages) + parts > MAX_ITEMS:
        raise APIError(400, f"messages: the conversation has {len(messages):,} messages and {parts:,} content parts; "
                       f"at most {MAX_ITEMS:,} in all", param="messages")


def refuse_unsupported(request: ChatRequest):
    for name, value in (request.model_extra or {}).items():
        if name in NEUTRAL and not any(_same(value, neutral) for neutral in NEUTRAL[name]):
            raise APIError(400, f"{name}: not supported by this server (it answers with one plain-text choice and "
                           "samples with temperature, top_p and seed only)", param=name, code="unsupported_parameter")


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
    messages, images = [], []
    for index, message in enumerate(request.messages):
        content = message.content or ""
        role = "system" if message.role == "developer" else message.role
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
        messages.append({"role": role, "content": parts if role == "user" else "".join(part["text"] for part in parts)})
    return messages, images


def usage(progress: Progress) -> dict:
    return {"prompt_tokens": progress.prompt_tokens, "completion_tokens": progress.completion_tokens,
            "total_tokens": progress.prompt_tokens + progress.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": progress.cached_tokens}}


class Completion:
    """One response's identity, and its objects: the whole completion, or its stream's chunks."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def whole(self, progress: Progress) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": progress.text},
                             "finish_reason": progress.finish_reason, "logprobs": None}],
                "usage": usage(progress)}

    def chunk(self, delta: dict, finish_reason: str | None = None, with_usage: bool = False) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        if with_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has the key, only the last one a value
        return chunk

    def usage_chunk(self, progress: Progress) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage(progress)}
