"""The checkpoint under evaluation, answering greedily (as the paper evaluates) one question at a time."""

import torch
from transformers import AutoModel, AutoProcessor

import llava_plugin  # noqa: F401  (registers the Auto classes)
from llava_plugin import load_image


class Candidate:
    def __init__(self, model_path: str, device: str | None = None, max_new_tokens: int = 512, chat_template: str | None = None):
        """`chat_template`: asks in another layout than the checkpoint's own template (None: its own)."""
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModel.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path)
        self.max_new_tokens = max_new_tokens
        self.chat_template = chat_template
        self.name = str(model_path)

    def answer(self, question: str, image=None, max_new_tokens: int | None = None) -> str:
        """`image`: a PIL image, a path, or None for a text-only question."""
        return self.answer_many([question], image, max_new_tokens)[0]

    def prompt(self, question: str, with_image: bool = True, history: tuple[tuple[str, str], ...] = ()) -> str:
        """The text the model reads for one question: a conversation of the `history` turns (question, answer) and
        then `question`, the image (if any) in its first turn (where the chat template renders it: a template made with
        `image_after_text` puts it after the newest question)."""
        turns = [*history, (question, None)]
        messages = []
        for number, (asked, answered) in enumerate(turns):
            image = [{"type": "image"}] if with_image and number == 0 else []
            messages.append({"role": "user", "content": image + [{"type": "text", "text": asked}]})
            if answered is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, chat_template=self.chat_template)

    @torch.no_grad()
    def answer_many(self, questions: list[str], image=None, max_new_tokens: int | None = None,
                    history: tuple[tuple[str, str], ...] = ()) -> list[str]:
        """Several questions about one image (or none), each in its own conversation (after the same `history` turns),
        generated as one left-padded batch: greedy answers equal one-at-a-time ones (tests/test_modeling.py checks
        the batching)."""
        if image is not None:
            image = load_image(image) if not hasattr(image, "convert") else image.convert("RGB")
        prompts = [self.prompt(q, with_image=image is not None, history=history) for q in questions]
        tokenizer = self.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            inputs = self.processor(images=[image] * len(questions) if image is not None else None, text=prompts,
                                    padding=True, return_tensors="pt").to(self.device)
        finally:
            tokenizer.padding_side = side
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        ids = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens, do_sample=False)
        return [text.strip() for text in self.processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
