"""Streaming multi-turn image chat on any llava_plugin, llava-hf or original LLaVA checkpoint, reusing each
session's KV cache and vision features across turns (the original LLaVA worker re-encoded everything every turn)."""

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor, DynamicCache

from llava_plugin import ImageLoadError, load_image
from llava_plugin.convert import convert, detect_format, local_folder

from .decoding import decode
from .sessions import Session, SessionStore
from .static_slots import SlotPool, StaticSlot, supports_static_slots
from .untrusted import MAX_CONVERSATION_CHARS, UntrustedInputError, check_text, open_image, plain_messages

CACHE = Path(os.environ.get("LLAVA_PLUGIN_CACHE", "~/.cache/llava-plugin")).expanduser()
MAX_IMAGE_SIDE = 2048


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


def common_prefix(cached: torch.Tensor | None, ids: torch.Tensor) -> int:
    if cached is None:
        return 0
    length = min(len(cached), len(ids))
    differ = (cached[:length] != ids[:length]).nonzero()
    return int(differ[0]) if len(differ) else length


def conversation_text(messages: list[dict]) -> str:
    return "".join(message["content"] if isinstance(message["content"], str)
                   else "".join(part.get("text", "") for part in message["content"]) for message in messages)


def fingerprint(image) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest() + f":{image.size}"


class ChatEngine:
    """Streams answers; with a session id, each turn reuses what earlier turns computed: the KV cache up to where
    the new prompt departs from the cached tokens (so regenerate and undo crop it), and the image's vision features
    (the tower runs once per image per session).

    On CUDA, up to `static_slots` sessions at a time keep their cache in a fixed-address slot of `slot_tokens`
    tokens whose steps replay as CUDA graphs (see static_slots); the others, and conversations longer than a slot,
    use a growing DynamicCache and eager steps. `static_slots=0` turns slots off; on the CPU they are off by default
    and, when asked for, run eagerly (graphs need CUDA)."""

    def __init__(self, model_path: str, device: str | None = None, max_sessions: int = 64, max_cached_tokens: int = 65_536,
                 static_slots: int | None = None, slot_tokens: int = 2048):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_path = resolve_checkpoint(model_path)
        self.model = AutoModel.from_pretrained(model_path, trust_remote_code=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
        self.sessions = SessionStore(max_sessions, max_cached_tokens)
        self._generation = threading.Lock()  # one step at a time on the shared model
        on_cuda = torch.device(self.device).type == "cuda"
        static_slots = (4 if on_cuda else 0) if static_slots is None else static_slots
        self.slots = None
        if static_slots > 0 and supports_static_slots(self.model):
            self.slots = SlotPool(self.model, static_slots, slot_tokens, graphs=on_cuda)

    def stream(self, messages: list[dict], image, temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 512,
               session_id: str | None = None) -> Iterator[str]:
        """Yields the growing answer to `messages` (chat-template format, one image part in the first user turn)."""
        session = self.sessions.get(session_id) if session_id else Session()
        with session.lock:
            answer = ""
            turn = self._stream(session, messages, image, temperature, top_p, max_new_tokens, evict=bool(session_id))
            try:
                for answer in turn:
                    yield answer
            finally:
                turn.close()  # its own cleanup first: it records what the cache holds
                if not session_id:
                    session.drop_cache()  # a one-off answer frees its slot at once
            session.messages, session.image = [*messages, {"role": "assistant", "content": answer}], image
        self.sessions.trim(keep=session)

    def conversation(self, session_id: str) -> tuple[list[dict], object]:
        """The session's conversation so far and its image ([] and None when there is none)."""
        session = self.sessions.get(session_id)
        return list(session.messages), session.image

    def reset(self, session_id: str):
        self.sessions.reset(session_id)

    def _stream(self, session: Session, messages, image, temperature, top_p, max_new_tokens, evict: bool) -> Iterator[str]:
        try:
            # A huge photo: the tower sees 336 px anyway, keep memory and time flat. A file is measured from its
            # header before decoding (untrusted); an image object in memory was the caller's to decode.
            if isinstance(image, (str, os.PathLike, bytes)):
                image = open_image(image, max_side=MAX_IMAGE_SIDE)
            else:
                image = load_image(image)
                if max(image.size) > MAX_IMAGE_SIDE:
                    image = image.copy()
                    image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE))
            check_text(conversation_text(messages), MAX_CONVERSATION_CHARS, "the conversation")
            messages = plain_messages(messages, self.processor.tokenizer.all_special_tokens)
            key = fingerprint(image)  # hashes every pixel: once per turn
            if key != session.image_key:
                session.forget_image()
                session.image_key = key
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            ids, pixel_values = self._inputs(prompt, image, session.vision_features is not None)
        except (ImageLoadError, UntrustedInputError, ValueError) as error:  # unreadable or huge image, too long
            raise ChatError(str(error)) from error
        ids = ids.to(self.device)
        extra = self._reuse(session, ids[0], pixel_values, max_new_tokens, evict)
        if extra and self.model.config.image_grid_pinpoints is not None:  # AnyRes: the tiles are laid out by the image's size
            extra["image_sizes"] = torch.tensor([[image.height, image.width]], device=self.device)
        keep = session.cached_tokens
        generation = self.model.generation_config
        stop_ids = {generation.eos_token_id} if isinstance(generation.eos_token_id, int) else set(generation.eos_token_id or [])
        stop_ids.add(self.processor.tokenizer.eos_token_id)
        tokens: list[int] = []
        consistent = False
        try:
            for token in decode(self._step(session.cache), ids, keep, max_new_tokens, temperature, top_p, stop_ids,
                                list(generation.suppress_tokens or []), self._generation, **extra):
                tokens.append(token)
                yield self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
            consistent = True
            if not tokens:
                yield ""
        except GeneratorExit:  # the reader stopped (Stop button, disconnect): decoding stops here, the cache is sound
            consistent = True
            raise
        finally:
            if consistent:  # the cache holds the prompt and every generated token but the last (never fed back)
                generated = torch.tensor(tokens, device=ids.device, dtype=ids.dtype)
                session.tokens = torch.cat([ids[0], generated])[: session.cache.get_seq_length()]
            else:
                session.drop_cache()  # a step failed half-way: start clean next turn

    def _inputs(self, prompt: str, image, have_features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's token ids, and the image's pixels unless its features are already computed. Then only the
        image's token layout is needed, which is the processor's: its marker, a special token, repeated
        image_seq_length times. Preprocessing the pixels again, or tokenizing the repeated markers, would cost more
        than the whole step on a GPU."""
        marker = self.processor.image_token
        if not have_features or prompt.count(marker) != 1:
            inputs = self.processor(images=image, text=prompt, return_tensors="pt")
            return inputs["input_ids"], inputs["pixel_values"]
        ids = self.processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
        at = int((ids[0] == self.processor.image_token_id).nonzero()[0])
        count = self.processor.image_seq_length
        if getattr(self.processor.image_processor, "image_grid_pinpoints", None) is not None:  # AnyRes: by the image's size
            count = self.processor.anyres_token_count(image.height, image.width)
        ids = torch.cat([ids[:, :at], ids[:, at: at + 1].expand(1, count), ids[:, at + 1:]], dim=1)
        context = self.processor.tokenizer.model_max_length
        if ids.shape[1] > context:
            raise ValueError(f"the conversation is {ids.shape[1]} tokens but the model's context is {context}; start a new one")
        return ids, None

    def _step(self, cache):
        if isinstance(cache, StaticSlot):
            return cache.forward
        return lambda step_ids, image_inputs: self.model(input_ids=step_ids, cache=cache, use_cache=True, logits_to_keep=1,
                                                         **image_inputs).logits[:, -1]

    def _reuse(self, session: Session, ids: torch.Tensor, pixel_values: torch.Tensor | None, max_new_tokens: int, evict: bool) -> dict:
        """Crops the session's cache to the prefix it shares with `ids` (or gives it a fresh one); returns the image
        input the rest needs."""
        keep = common_prefix(session.tokens, ids)
        image_positions = (ids == self.model.config.image_token_id).nonzero()
        first_image = int(image_positions[0]) if len(image_positions) else None
        if first_image is not None and keep <= int(image_positions[-1]):
            keep = min(keep, first_image)  # an image span is recomputed whole or not at all
        keep = min(keep, len(ids) - 1)  # generate needs at least one new token to run
        fits_a_slot = self.slots is not None and len(ids) + max_new_tokens <= self.slots.capacity
        if isinstance(session.cache, StaticSlot) and not fits_a_slot:
            session.drop_cache()  # the conversation outgrew its slot: recompute it once into a DynamicCache
        if session.cache is None or keep == 0:
            if not (fits_a_slot and self.slots.acquire(session, evict)):
                session.cache = DynamicCache(config=self.model.config.get_text_config())
            keep = 0
        elif keep < session.cached_tokens:
            session.cache.crop(keep - session.cached_tokens)
        session.tokens = ids[:keep]
        if first_image is None or keep > first_image:
            return {}
        if session.vision_features is None:
            with torch.no_grad():
                session.vision_features = self.model.get_vision_features(pixel_values.to(self.device))
        return {"vision_features": session.vision_features}
