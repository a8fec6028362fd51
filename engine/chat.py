"""Streaming multi-turn image chat on any llava_plugin checkpoint.

Each turn re-encodes the conversation, as the original LLaVA worker does; keeping the KV cache across turns is the
app issue's work.
"""

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor, TextIteratorStreamer

from llava_plugin import ImageLoadError, load_image
from llava_plugin.convert import convert, detect_format, local_folder

CACHE = Path(os.environ.get("LLAVA_PLUGIN_CACHE", "~/.cache/llava-plugin")).expanduser()


def resolve_checkpoint(source: str, cache: Path | None = None) -> str:
    """A llava_plugin folder for any checkpoint: llava-hf and original LLaVA ones are converted once and cached
    (keyed by where they are and when their config changed)."""
    cache = cache or CACHE
    folder = local_folder(source)
    if detect_format(folder) == "llava_plugin":
        return str(folder)
    config = folder / "config.json"
    key = hashlib.sha256(f"{folder.resolve()}:{config.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache / "converted" / f"{folder.name}-{key}"
    if not target.exists():
        convert(str(folder), str(target))
    return str(target)


class ChatError(ValueError):
    """A problem with the user's input, worded for the user."""


class ChatEngine:
    def __init__(self, model_path: str, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_path = resolve_checkpoint(model_path)
        self.model = AutoModel.from_pretrained(model_path, trust_remote_code=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)

    def stream(
        self, messages: list[dict], image, temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 512
    ) -> Iterator[str]:
        """Yields the growing answer to `messages` (chat-template format, one image part in the first user turn)."""
        try:
            image = load_image(image)
        except ImageLoadError as error:
            raise ChatError(str(error)) from error
        try:
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(images=image, text=prompt, return_tensors="pt").to(self.device)
        except ValueError as error:  # too long for the context, or image markers that do not match
            raise ChatError(str(error)) from error
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        failure: list[BaseException] = []

        def generate():
            try:
                self.model.generate(**inputs, streamer=streamer, max_new_tokens=max_new_tokens, **sampling)
            except BaseException as error:  # surfaced below: a silent worker would leave the stream waiting forever
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        answer = ""
        for piece in streamer:
            answer += piece
            yield answer.strip()
        worker.join()
        if failure:
            raise failure[0]
