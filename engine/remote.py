"""ChatEngine's interface over any OpenAI-compatible server (llava-serve, vLLM, SGLang), so the app can be a front
end for an engine elsewhere: the same `stream` generator, the image sent as a data URL, the official openai client
(its own timeouts and retries).

The server keeps no state between requests and neither does this side: every call sends the whole conversation, and
the server finds what it computed before by prefix (llava-serve and vLLM both cache prefixes)."""

import base64
import io
import os
from collections.abc import Iterator

import openai

from .decoding import NonFiniteScores
from .prompts import MAX_IMAGE_SIDE, ChatError
from .untrusted import UntrustedInputError, open_image


def data_url(image) -> str:
    """A PNG data URL of a path, bytes or PIL image, checked and bounded as the local engine would."""
    try:
        if isinstance(image, (str, os.PathLike, bytes)):
            image = open_image(image, max_side=MAX_IMAGE_SIDE)
    except UntrustedInputError as error:
        raise ChatError(str(error)) from error
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(messages: list[dict], image_url: str | None) -> list[dict]:
    """Chat-template messages -> OpenAI ones: the `{"type": "image"}` part becomes an image_url part."""
    converted = []
    for message in messages:
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": "image_url", "image_url": {"url": image_url}} if part.get("type") == "image"
                       else {"type": "text", "text": part.get("text", "")} for part in content]
        converted.append({"role": message["role"], "content": content})
    return converted


class RemoteChat:
    """`stream` answers through the server at `base_url` (e.g. http://127.0.0.1:8000/v1); `model` None: the first
    model the server lists."""

    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None, timeout: float = 120.0):
        # a placeholder key for servers that need none: the client refuses to start without one
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", timeout=timeout)
        self._model = model

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.client.models.list().data[0].id
        return self._model

    def stream(self, messages: list[dict], image, temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 512,
               session_id: str | None = None) -> Iterator[str]:
        """Yields the growing answer, as ChatEngine.stream does; ChatError when the server refuses the input.
        `session_id` is ChatEngine's: taken and unused, since the server finds a session's prefix by itself."""
        answer = ""
        try:
            chunks = self.client.chat.completions.create(
                model=self.model, messages=openai_messages(messages, None if image is None else data_url(image)), temperature=temperature,
                top_p=top_p, max_tokens=max_new_tokens, stream=True)
            with chunks:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        answer += chunk.choices[0].delta.content
                        yield answer
        except (openai.BadRequestError, openai.UnprocessableEntityError) as error:
            raise ChatError(error.body.get("message", str(error)) if isinstance(error.body, dict) else str(error)) from error
        except openai.APIError as error:  # an error event in the stream: llava-serve's for an answer the model broke off
            if isinstance(error.body, dict) and error.body.get("code") == "model_output_not_finite":
                raise NonFiniteScores(error.body.get("message") or str(error)) from error
            raise
        if not answer:
            yield ""
