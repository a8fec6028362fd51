"""The processor: images and text in, model inputs out.

Each `<image>` in the text becomes `image_seq_length` image tokens (one per vision feature the model will scatter
there). The chat template reproduces LLaVA's v1 conversation format and marks assistant text with
`{% generation %}`, so `apply_chat_template(..., return_assistant_tokens_mask=True)` yields the training mask.
This file ships as remote code.
"""

import json
import math

from transformers import ProcessorMixin

from .anyres import image_token_count
from .image_processing_llava_plugin import LlavaPluginImageProcessor  # noqa: F401  (AutoProcessor resolves it by name)

DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

# With `add_generation_prompt`: every user turn's image parts, gathered for the newest user turn (`ns.last`, its index).
MOVE_IMAGES_TO_NEWEST_QUESTION = (
    "{%- set ns = namespace(images=[], last=-1) -%}"
    "{%- if add_generation_prompt -%}{%- for message in turns -%}{%- if message['role'] == 'user' -%}"
    "{%- set ns.last = loop.index0 -%}"
    "{%- if message['content'] is not string -%}"
    "{%- set ns.images = ns.images + (message['content'] | selectattr('type', 'equalto', 'image') | list) -%}"
    "{%- endif -%}{%- endif -%}{%- endfor -%}{%- endif -%}"
)
RENDER_WITH_MOVED_IMAGES = (
    "{%- if ns.last >= 0 -%}"
    "{%- set content = [{'type': 'text', 'text': message['content']}] if message['content'] is string else message['content'] -%}"
    "{{ render((content | rejectattr('type', 'equalto', 'image') | list) + (ns.images if loop.index0 == ns.last else [])) }}"
    "{%- else -%}{{ render(message['content']) }}{%- endif -%}"
)


# LLaVA v1 ("vicuna_v1"): SYSTEM USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q} ASSISTANT:
# The space after "ASSISTANT:" sits inside the generation block: at inference the prompt ends with "ASSISTANT:" and
# the model writes " {a}</s>", so training and inference see the same token boundaries.
def llava_v1_chat_template(system: str = DEFAULT_SYSTEM, image_after_text: bool = False) -> str:
    """The v1 template with `system` as the default system prompt (a conversation may still bring its own). A model
    trained from scratch may use a short one: every prompt token costs compute in every training sample.

    `image_after_text` renders a turn's image after its text, wherever the message puts it ("{q}\\n<image>"). A small
    model may answer only in the order it was trained on; the template, saved with its processor, then asks every
    caller's question that way. In a prompt for the next answer (`add_generation_prompt`) the conversation's images
    go after the newest question instead of the one they came with: a follow-up after the image is a layout that
    image tokens cannot read (they come before the question), and the shapes model answered follow-ups far better
    with the image moved (issue 5's notes). Conversations rendered for training keep the images where they are."""
    order = ("{%- set parts = (content | rejectattr('type', 'equalto', 'image') | list)"
             " + (content | selectattr('type', 'equalto', 'image') | list) -%}") if image_after_text else "{%- set parts = content -%}"
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{ content }}"
        "{%- else -%}" + order + "{%- for part in parts -%}"
        "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
        "{%- if part['type'] == 'image' -%}{{ '<image>' }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{{ render(messages[0]['content']) }}{%- set turns = messages[1:] -%}"
        "{%- else -%}"
        "{{ " + json.dumps(system) + " }}{%- set turns = messages -%}"  # a JSON string is a valid Jinja literal
        "{%- endif -%}"
        + (MOVE_IMAGES_TO_NEWEST_QUESTION if image_after_text else "") +
        "{%- for message in turns -%}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('conversation roles must alternate user/assistant/user/... after an optional system message') }}"
        "{%- endif -%}"
        "{%- if message['role'] == 'user' -%}"
        "{%- if loop.first -%}{{ ' ' }}{%- endif -%}{{ 'USER: ' }}"
        + (RENDER_WITH_MOVED_IMAGES if image_after_text else "{{ render(message['content']) }}") +
        "{%- else -%}"
        "{{ ' ASSISTANT:' }}{% generation %}{{ ' ' }}{{ render(message['content']) }}{{ eos_token }}{% endgeneration %}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
    )


LLAVA_V1_CHAT_TEMPLATE = llava_v1_chat_template()

# LLaVA's stage-1 "plain" format: the user turn's images, then the answer (a caption) and a newline; no system prompt,
# and the user's text (an instruction) is dropped, so W learns from the caption alone. Only the caption and newline
# are learned. A training format: the model keeps its chat template for stage 2 and chat.
PLAIN_CHAT_TEMPLATE = (
    "{%- macro text(content) -%}{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{%- if messages | map(attribute='role') | list != ['user', 'assistant'] -%}"
    "{{ raise_exception('the plain template takes one user turn and one answer') }}{%- endif -%}"
    "{%- if messages[0]['content'] is not string -%}"
    "{%- for part in messages[0]['content'] if part['type'] == 'image' -%}{{ '<image>' }}{%- endfor -%}{%- endif -%}"
    "{% generation %}{{ text(messages[1]['content']) }}{{ '\\n' }}{% endgeneration %}"
)


class LlavaPluginProcessor(ProcessorMixin):
    """Wraps the image processor and tokenizer; checks image counts and the context length before the model does."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=576, image_token="<image>", chat_template=None,
                 split_text_at_images=False, **kwargs):
        """`split_text_at_images`: tokenize the text after each image as a text of its own, as the original LLaVA
        did (it tokenized the pieces between `<image>` markers one by one). With a SentencePiece tokenizer that adds
        its word prefix only at the start of a text (Llama's `legacy: false`), that start is an extra "▁" token
        after every image; checkpoints imported from the original were trained with it. Other tokenizers, whose
        text after a special token already starts like a new text, tokenize the same either way."""
        self.image_seq_length = image_seq_length
        self.image_token = image_token
        self.split_text_at_images = split_text_at_images
        self._start_after_image = None  # what makes text after an image start like a text of its own; see below
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token; add it as a special token first")
        super().__init__(image_processor, tokenizer, chat_template=chat_template or LLAVA_V1_CHAT_TEMPLATE)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        pinpoints = getattr(self.image_processor, "image_grid_pinpoints", None)
        if pinpoints is None:
            return self.image_token * self.image_seq_length
        return self.image_token * self.anyres_token_count(*image_inputs["image_sizes"][image_idx])

    def anyres_token_count(self, height: int, width: int) -> int:
        """AnyRes: image tokens for an image of this original size (image_seq_length is one tile's patches)."""
        side = math.isqrt(self.image_seq_length)
        if side * side != self.image_seq_length:
            raise ValueError(f"AnyRes needs a square patch grid per tile; image_seq_length is {self.image_seq_length}")
        processor = self.image_processor
        return image_token_count(int(height), int(width), processor.image_grid_pinpoints, processor.image_size, side)

    def get_text_with_replacements(self, text, images_replacements=(), *args, **kwargs):
        """With `split_text_at_images`, each image that text follows gets the prefix that makes that text tokenize
        as a text of its own (the original tokenized nothing for an empty piece, so an image followed by nothing or
        by another image gets none)."""
        if self.split_text_at_images and images_replacements and (prefix := self.start_after_image()):
            followed = [bool(piece) for sample in text for piece in sample.split(self.image_token)[1:]]
            images_replacements = [replacement + prefix if text_follows else replacement
                                   for replacement, text_follows in zip(images_replacements, followed)]
        return super().get_text_with_replacements(text, list(images_replacements), *args, **kwargs)

    def start_after_image(self) -> str:
        """"" when text after the image token already tokenizes as it would alone; " " for a SentencePiece-style
        tokenizer that adds its "▁" word prefix only at the start of a text. Found by asking the tokenizer."""
        if self._start_after_image is None:
            def ids(text):
                return self.tokenizer(text, add_special_tokens=False)["input_ids"]

            alone, after = ids("a"), ids(self.image_token + "a")[1:]
            if alone == after:
                self._start_after_image = ""
            elif ids(self.image_token + " a")[1:] == alone:
                self._start_after_image = " "
            else:
                raise ValueError(f"split_text_at_images: this tokenizer tokenizes text after {self.image_token!r} in a way "
                                 f"no prefix reproduces ({after} after it, {alone} alone)")
        return self._start_after_image

    def __call__(self, images=None, text=None, **kwargs):
        """As every transformers processor, plus: a prompt longer than the tokenizer's `model_max_length` (set from
        the language model's context) raises unless `truncation=True`. (transformers itself refuses a truncation
        that cuts into an image.)"""
        outputs = super().__call__(images=images, text=text, **kwargs)
        truncation = kwargs.get("truncation") or kwargs.get("text_kwargs", {}).get("truncation")
        if text is not None and not truncation:
            self._check_context(outputs, text)
        return outputs

    def _check_context(self, outputs, text):
        texts = [text] if isinstance(text, str) else list(text)
        rows, masks = (_as_lists(outputs.get(key)) for key in ("input_ids", "attention_mask"))
        context = self.tokenizer.model_max_length
        for index, (row, sample) in enumerate(zip(rows, texts)):
            length = sum(masks[index]) if masks is not None else len(row)  # padding does not count
            if length > context:
                images, image_tokens = sample.count(self.image_token), list(row).count(self.image_token_id)
                raise ValueError(
                    f"prompt {index} is {length} tokens ({image_tokens} of them for {images} images) but the model's "
                    f"context is {context}; shorten it or pass truncation=True"
                )

def _as_lists(values):
    return values.tolist() if hasattr(values, "tolist") else values


LlavaPluginProcessor.register_for_auto_class()

__all__ = ["LlavaPluginProcessor", "LLAVA_V1_CHAT_TEMPLATE", "PLAIN_CHAT_TEMPLATE", "DEFAULT_SYSTEM", "llava_v1_chat_template"]
