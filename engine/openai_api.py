"""OpenAI's chat-completions format: the request as a typed model, its messages in the engine's form, and the
response, chunk and error objects. No HTTP here (that is server.py)."""

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .chat import Progress
from .decoding import Sampling
from .media import MediaPolicy, image_bytes

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
    """The fields we honour; others a client may send (user, metadata, ...) are ignored, and the ones that would
    change the answer's shape and that we cannot honour (n > 1, tools, logprobs) are refused."""
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # what a torch generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    tools: list | None = Field(None, max_length=0)
    logprobs: bool | None = Field(None, le=False)

    @property
    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(stop for stop in stops if stop)

    def sampling(self, max_tokens: int) -> Sampling:
        wanted = self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS
        return Sampling(temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p,
                        max_new_tokens=min(wanted, max_tokens), seed=self.seed)


def parse_request(body: bytes) -> ChatRequest:
    try:
        request = ChatRequest.model_validate_json(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None
    if len(request.stops) > 4:
        raise APIError(400, "stop: at most 4 stop strings", param="stop")
    return request


def engine_messages(request: ChatRequest, policy: MediaPolicy) -> tuple[list[dict], bytes]:
    """The conversation in chat-template form and its one image's bytes (the model answers about one image)."""
    messages, image = [], None
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
            if image is not None:
                raise APIError(400, "this model answers about one image per conversation; this one has more", param=where)
            try:
                image = image_bytes(part.image_url.url, policy)
            except ValueError as error:
                raise APIError(getattr(error, "status", 400), str(error), param=where,
                               code="image_too_large" if getattr(error, "status", 400) == 413 else "invalid_image") from None
            parts.append({"type": "image"})
        messages.append({"role": role, "content": parts if role == "user" else "".join(part["text"] for part in parts)})
    if image is None:
        raise APIError(400, "this model answers about an image: send one image_url part in a user message", param="messages")
    return messages, image


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
