"""A request's prompt: its images decoded, checked and fingerprinted, its messages checked and rendered by the chat
template, and its token ids laid out: all of a turn's work that needs the processor but not the model.

ChatEngine prompts in the thread that asks; llava-serve prompts in its HTTP process and sends the Prompt to the
engine's process (engine_process), as vLLM's API server renders and tokenizes for its engine core: there it took
about 1 ms of Python per request, which the interpreter's lock serialized with the scheduler's thread, on the one
core the model has."""

import dataclasses
import functools
import hashlib
import os

import torch
from jinja2 import Environment, TemplateError, TemplateSyntaxError, meta, nodes
from jinja2.ext import Extension

from llava_plugin import ImageLoadError, load_image

from .answer_text import continuation
from .decoded_images import DecodedImages
from .untrusted import MAX_CONVERSATION_CHARS, MESSAGE_OVERHEAD, UntrustedInputError, conversation_size, open_image, plain_messages

MAX_IMAGE_SIDE = 2048


class ChatError(ValueError):
    """A problem with the user's input, worded for the user."""


class ContextTooLong(ChatError):
    """The prompt does not fit the model's context (the API's `context_length_exceeded`)."""


class TruncationRefused(ChatError):
    """truncate_prompt_tokens would cut into an image's tokens (the API names that field)."""


class TokenRulesRefused(ChatError):
    """An answer's allowed_token_ids, with its bad_words and min_tokens, leave it no token to draw (the API names
    allowed_token_ids)."""


class StructureRefused(ChatError):
    """The answer's structured output cannot be held: its spec gives no grammar, or one that allows no answer or
    costs too much per token (the API names the field it came in)."""


def fingerprint(image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest() + f":{image.size}"


@dataclasses.dataclass
class Prompt:
    """What a turn answers. `ids` (1, T) are the prompt's tokens with each image's span laid out, when that needs no
    pixels (one image and one marker: the processor's own layout, see Prompter.prompt); else None and the turn runs
    the processor. `images` are the decoded images in this process; a Prompt sent to another process leaves them
    behind, and `sources` (the encoded bytes, paths or image objects it was given) are decoded again there if the
    turn needs pixels (the images' features are not cached)."""
    text: str
    key: str  # the images' fingerprints, joined: the prefix cache's and a session's image key
    sizes: list[tuple[int, int]]  # (height, width) of each image: AnyRes lays out its tiles by it
    sources: list
    ids: torch.Tensor | None = None
    images: list | None = None
    # the prompt's last token ids when it continues its last message (continue_final_message): the answer's text
    # is then what follows them, raw (answer_text.chat_context), not a new message's stripped text
    continued: list[int] | None = None
    salt: str | None = None  # its cache salt: it shares cached prefixes with prompts of the same salt only (prefix_cache)
    keep_last: int | None = None  # vLLM's truncate_prompt_tokens: only its last this many tokens are read

    def __getstate__(self) -> dict:
        state = dict(self.__dict__, images=None)
        if self.ids is not None:  # a tensor would travel through shared memory, a file per message
            state["ids"] = self.ids.tolist()
        return state

    def __setstate__(self, state: dict):
        if state["ids"] is not None:
            state["ids"] = torch.tensor(state["ids"], dtype=torch.long)
        self.__dict__.update(state)


def template_flags(rendering: dict | None) -> tuple[bool, bool]:
    """A rendering's add_generation_prompt (true unless it says false) and continue_final_message (false unless it
    says true)."""
    rendering = rendering or {}
    return rendering.get("add_generation_prompt", True) is not False, rendering.get("continue_final_message", False) is True


# the names apply_chat_template gives the template, or takes as its own parameters: never a client's
RENDERER_NAMES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "chat_template",
                            "raise_exception", "strftime_now", "tokenize", "return_dict", "return_tensors", "processor_kwargs",
                            "return_assistant_tokens_mask", "sanitize_control_tokens", "load_audio_from_video"})


class _GenerationBlock(Extension):
    """transformers' `{% generation %}` block (its assistant-mask marker), read as its body: enough to list the
    variables a template reads, which is all this parses for."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=8)
def template_variables(template: str | None) -> frozenset[str]:
    """The variables a chat template reads that it sets nowhere (jinja's own list counts a name set in one branch
    only, or a macro's argument); none for a template this cannot parse (a tag of some other renderer's): then no
    client argument reaches it."""
    if not template:
        return frozenset()
    try:
        parsed = Environment(extensions=["jinja2.ext.loopcontrols", _GenerationBlock]).parse(template)
    except TemplateSyntaxError:
        return frozenset()
    stored = {name.name for name in parsed.find_all(nodes.Name) if name.ctx in ("store", "param")}
    stored |= {argument.name for macro in parsed.find_all(nodes.Macro) for argument in macro.args}
    return frozenset(meta.find_undeclared_variables(parsed) - stored)


class Prompter:
    """Prompts for one processor; keeps the images it decoded (see DecodedImages)."""

    def __init__(self, processor):
        self.processor = processor
        self._images = DecodedImages()

    def prompt(self, messages: list[dict], image, rendering: dict | None = None, salt: str | None = None,
               keep_last: int | None = None) -> Prompt:
        """The Prompt of `messages` (chat-template format) and `image` (one, a list for a conversation with several, or
        None for a conversation without images); ChatError for input we refuse. `rendering`: the chat template's
        arguments (see template_arguments); by default the assistant's next message is opened after the last.
        `salt`: the Prompt's cache salt; `keep_last`: the Prompt's (see `kept`)."""
        sources = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        later = next((index for index, message in enumerate(messages) if index and message.get("role") == "system"), None)
        if later is not None:  # LLaVA's prompt has one system text, first: a template would render it as anything else
            raise ChatError(f"messages.{later}: a system message comes first, before the conversation; this model's prompt "
                            "has no place for one later")
        try:
            decoded = [self.decoded(source) for source in sources]
            if conversation_size(messages) > MAX_CONVERSATION_CHARS:
                raise UntrustedInputError(f"the conversation ({len(messages):,} messages) is over the limit of "
                                          f"{MAX_CONVERSATION_CHARS:,} characters (each message counts {MESSAGE_OVERHEAD} more)")
            messages = plain_messages(messages, self.processor.tokenizer.all_special_tokens)
            arguments = self.template_arguments(rendering)
            text = self.processor.apply_chat_template(messages, **arguments)
        except (ImageLoadError, UntrustedInputError, ValueError, TemplateError) as error:  # unreadable or huge image
            raise ChatError(str(error)) from error
        images = [image for image, _ in decoded]
        prompt = Prompt(text, "+".join(key for _, key in decoded), [(image.height, image.width) for image in images], sources,
                        images=images, salt=salt, keep_last=keep_last)
        try:
            prompt.ids = self._laid_out(text, images, keep_last)
        except ChatError:  # too long for the model
            raise
        except ValueError as error:  # markers and images that do not match
            if arguments["continue_final_message"]:  # the template renders a message's images after its text, cut off
                raise ChatError(f"continue_final_message: the continued message ends before its images' place in the prompt "
                                f"({error}); send its images in an earlier message, or open a new turn") from error
            raise ChatError(str(error)) from error
        if arguments["continue_final_message"]:
            tail = prompt.ids[0] if prompt.ids is not None else self.processor.tokenizer(text)["input_ids"]
            prompt.continued = continuation(list(map(int, tail)))
        return prompt

    def template_arguments(self, rendering: dict | None) -> dict:
        """apply_chat_template's arguments for a client's `rendering`: add_generation_prompt (true unless it says
        false) and continue_final_message (false unless it says true), and of its other keys (chat_template_kwargs)
        those the template reads, as vLLM passes them. Keys the template does not read are dropped, and so are the
        names the renderer gives the template itself (messages, the special tokens: a client must not redefine the
        eos_token the template writes after each answer)."""
        rendering = rendering or {}
        reserved = RENDERER_NAMES | set(self.processor.tokenizer.special_tokens_map)
        extra = {key: value for key, value in rendering.items()
                 if key in template_variables(self.processor.chat_template) and key not in reserved}
        opened, continued = template_flags(rendering)
        return {**extra, "add_generation_prompt": opened, "continue_final_message": continued}

    def text_prompt(self, prompt: str | list[int], room: int = 0, add_special_tokens: bool = True, salt: str | None = None,
                    keep_last: int | None = None) -> Prompt:
        """The Prompt of a text-completion request: `prompt` is raw text, tokenized as it is (the tokenizer's own
        start token added, no chat template), or token ids; no images (their markers are refused: the model would
        look for features nobody sent). ChatError for input we refuse, ContextTooLong for a prompt that leaves the
        answer less than `room` tokens of the context. `add_special_tokens` false: a text's tokens without the
        tokenizer's start token (a client that wrote its own). `salt`: the Prompt's cache salt; `keep_last`: only
        the prompt's last this many tokens are read (see `kept`)."""
        tokenizer = self.processor.tokenizer
        if isinstance(prompt, str):
            if len(prompt) > MAX_CONVERSATION_CHARS:
                raise ChatError(f"the prompt ({len(prompt):,} characters) is over the limit of {MAX_CONVERSATION_CHARS:,}")
            ids, text = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"], prompt
        else:
            ids, text = list(prompt), ""
            outside = next((token for token in ids if not 0 <= token < len(tokenizer)), None)
            if outside is not None:
                raise ChatError(f"the prompt has the token id {outside}, outside the model's vocabulary (0 .. {len(tokenizer) - 1})")
        if not ids:
            raise ChatError("the prompt is empty")
        kept = self.kept(torch.tensor([ids], dtype=torch.long), keep_last, keep_start=isinstance(prompt, str) and add_special_tokens)[0].tolist()
        if len(kept) < len(ids):  # its echo is the text of what was read
            ids, text = kept, ""
        if self.processor.image_token_id in ids:
            raise ChatError(f"the prompt has the image token ({self.processor.image_token}); images go in messages of "
                            "/v1/chat/completions")
        context = tokenizer.model_max_length
        if len(ids) + room > context:
            raise ContextTooLong(f"the prompt is {len(ids)} tokens but the model's context is {context}"
                                 + (" (no room for a token of the answer)" if len(ids) <= context else ""))
        return Prompt(text, "", [], [], ids=torch.tensor([ids], dtype=torch.long), salt=salt)

    def inputs(self, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's token ids and pixels (None without images) for the prompt (its images decoded again if they
        stayed behind in another process); ValueError if too long for the model."""
        if not prompt.sources:
            return self._laid_out(prompt.text, [], prompt.keep_last), None
        images = prompt.images
        if images is None:
            images = [self.decoded(source)[0] for source in prompt.sources]
        inputs = self.processor(images=images if len(images) > 1 else images[0], text=prompt.text, return_tensors="pt")
        return self.kept(inputs["input_ids"], prompt.keep_last), inputs["pixel_values"]

    def kept(self, ids: torch.Tensor, keep_last: int | None, keep_start: bool = True) -> torch.Tensor:
        """The prompt's ids (1, T) with only `keep_last` of them read (vLLM's truncate_prompt_tokens): the last ones
        and, with `keep_start` (a prompt the tokenizer tokenized, as vLLM truncates it: on the left, special tokens
        kept), its start token first; TruncationRefused where that would cut into an image's tokens, which the
        model reads whole or not at all."""
        if keep_last is None or ids.shape[1] <= keep_last:
            return ids
        start = self.processor.tokenizer.bos_token_id
        head = 1 if keep_start and start is not None and int(ids[0, 0]) == start else 0
        cut = ids.shape[1] - keep_last + head  # ids[:, head:cut] go
        images = (ids[0] == self.processor.image_token_id).nonzero()
        if len(images) and int(images[0]) < cut:
            raise TruncationRefused(f"truncate_prompt_tokens: keeping the last {keep_last} of the prompt's {ids.shape[1]} tokens would "
                            f"cut an image's tokens; its first image begins {ids.shape[1] - int(images[0])} tokens from its end")
        return torch.cat([ids[:, :head], ids[:, cut:]], dim=1)

    def decoded(self, image) -> tuple:
        """The image and its fingerprint (a hash of every pixel). A huge photo: the tower sees 336 px anyway, keep
        memory and time flat. Encoded bytes (API requests) are measured from their header before decoding
        (untrusted), and decoded once however often a conversation sends them again; a file too; an image object
        in memory was the caller's to decode."""
        if isinstance(image, bytes):
            return self._images.get(image, lambda data: open_image(data, max_side=MAX_IMAGE_SIDE), fingerprint)
        if isinstance(image, (str, os.PathLike)):
            image = open_image(image, max_side=MAX_IMAGE_SIDE)
            return image, fingerprint(image)
        image = load_image(image)
        if max(image.size) > MAX_IMAGE_SIDE:
            image = image.copy()
            image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
        return image, fingerprint(image)

    def _laid_out(self, text: str, images: list, keep_last: int | None = None) -> torch.Tensor | None:
        """The prompt's token ids without running the processor on the pixels, where the layout needs none: the
        image's marker, a special token, repeated image_seq_length times (AnyRes: a count by the image's size).
        Preprocessing the pixels, or tokenizing the repeated markers, would cost more than the whole step on a GPU;
        a turn whose image's features are cached needs nothing else. None for several images or markers; without
        images, the text's tokens (the processor would add nothing to them)."""
        markers = text.count(self.processor.image_token)
        if markers != len(images):
            raise ValueError(f"the conversation has {markers} image markers for {len(images)} images")
        if markers > 1:
            return None
        ids = self.processor.tokenizer(text, return_tensors="pt")["input_ids"]
        if images:
            image = images[0]
            at = int((ids[0] == self.processor.image_token_id).nonzero()[0])
            count = self.processor.image_seq_length
            if getattr(self.processor.image_processor, "image_grid_pinpoints", None) is not None:  # AnyRes: by its size
                count = self.processor.anyres_token_count(image.height, image.width)
            ids = torch.cat([ids[:, :at], ids[:, at: at + 1].expand(1, count), ids[:, at + 1:]], dim=1)
        ids = self.kept(ids, keep_last)
        context = self.processor.tokenizer.model_max_length
        if ids.shape[1] > context:
            raise ContextTooLong(f"the conversation is {ids.shape[1]} tokens but the model's context is {context}; start a new one")
        return ids
