"""A candidate served by any OpenAI-compatible server (llava-serve, vLLM, SGLang, a gateway): each question is one
chat completion with the image as a `data:` URL content part, answered greedily (temperature 0). The official
client does the timeouts and retries. The key is this server's own (`--api-key` or LLAVA_EVAL_MODEL_API_KEY), never
OPENAI_API_KEY, which belongs to the judge: a key goes only to the server it was given for."""

import base64
import io
import os
from pathlib import Path

import openai
from PIL import Image

from llava_plugin import load_image

from .options import KEY_VARIABLE

SENT_AS_IS = {"PNG", "JPEG", "WEBP", "GIF"}  # formats servers decode: the file's own bytes go out unchanged


def image_data_url(image) -> str:
    """A path or PIL image -> `data:image/...;base64,...`; an unreadable image raises ImageLoadError."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        load_image(image).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    decoded = load_image(image)  # a missing, truncated or non-image file fails here, naming the path
    data = Path(image).read_bytes()
    with Image.open(io.BytesIO(data)) as opened:
        kind = opened.format
    if kind not in SENT_AS_IS:
        buffer = io.BytesIO()
        decoded.save(buffer, format="PNG")
        data, kind = buffer.getvalue(), "PNG"
    return f"data:{Image.MIME[kind]};base64," + base64.b64encode(data).decode()


class RemoteCandidate:
    def __init__(self, url: str, model_name: str | None = None, api_key: str | None = None, max_new_tokens: int = 512,
                 timeout: float = 120.0, max_retries: int = 8):
        key = api_key or os.environ.get(KEY_VARIABLE) or "EMPTY"  # "EMPTY": servers that want no key accept any
        self.client = openai.OpenAI(base_url=url, api_key=key, timeout=timeout, max_retries=max_retries)
        self.model_name = model_name or self._served_model(url)
        self.max_new_tokens = max_new_tokens
        self.name = f"{self.model_name} at {url}"

    def _served_model(self, url: str) -> str:
        served = [model.id for model in self.client.models.list()]
        if len(served) != 1:
            raise ValueError(f"{url} serves {len(served)} models ({', '.join(served) or 'none'}): name one with --model-name")
        return served[0]

    def answer(self, question: str, image=None, max_new_tokens: int | None = None) -> str:
        return self.answer_many([question], image, max_new_tokens)[0]

    def answer_many(self, questions: list[str], image=None, max_new_tokens: int | None = None,
                    history: tuple[tuple[str, str], ...] = ()) -> list[str]:
        """Each question in its own conversation after the `history` turns, the image in the first user turn."""
        picture = []
        if image is not None:
            picture = [{"type": "image_url", "image_url": {"url": image_data_url(image)}}]
        answers = []
        for question in questions:
            messages = []
            for number, (asked, answered) in enumerate([*history, (question, None)]):
                parts = (picture if number == 0 else []) + [{"type": "text", "text": asked}]
                messages.append({"role": "user", "content": parts})
                if answered is not None:
                    messages.append({"role": "assistant", "content": answered})
            response = self.client.chat.completions.create(model=self.model_name, messages=messages, temperature=0,
                                                           max_tokens=max_new_tokens or self.max_new_tokens)
            answers.append(((response.choices[0].message.content or "") if response.choices else "").strip())
        return answers
