"""Streaming multi-turn image chat on any llava_plugin, llava-hf or original LLaVA checkpoint, reusing each
session's KV cache and vision features across turns (the original LLaVA worker re-encoded everything every turn)."""

import dataclasses
import hashlib
import os
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoProcessor, DynamicCache

from llava_plugin.convert import convert, detect_format, local_folder

from .answer_text import Progress, Tokens, as_text, chat_context, continuation
from .decoding import NonFiniteScores, Sampling  # noqa: F401 (NonFiniteScores: engine's export)
from .prefix_cache import PrefixCache, common_prefix
from .prompts import ChatError, ContextTooLong, Prompt, Prompter, StructureRefused, TokenRulesRefused
from .scheduler import SCORED_LOGITS, Scheduler, Sequence
from .sessions import Session, SessionStore
from .static_slots import SlotPool, StaticSlot, supports_static_slots
from .structured_output import Constraint, Grammars, StructureError

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


def available_memory() -> int:
    """Bytes this process can still take: the kernel's MemAvailable, or less under a cgroup's (a container's) limit."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/proc/meminfo") as meminfo:
            memory = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            memory = min(memory, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return memory


def compute_dtype(model_path: str, device: str, dtype: str | torch.dtype = "auto") -> str | torch.dtype:
    """The dtype to run in. "auto" is the checkpoint's own, except on a CPU for a float16 or bfloat16 checkpoint whose
    float32 weights take at most half the memory still available: float32 then. CPUs multiply half-precision matrices
    slowly, most of all in batches (bench/decode_dtypes.py, the shapes model on the 2-core Xeon: eight rows 3.45 ms
    a step in float16, 2.87 in float32, 3.00 in bfloat16; one row 1.50, 1.58, 2.34), and float32 holds
    half-precision weights exactly."""
    if dtype != "auto" or torch.device(device).type != "cpu":
        return dtype
    stored = getattr(AutoConfig.from_pretrained(model_path, trust_remote_code=True), "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if stored not in (torch.float16, torch.bfloat16):
        return dtype
    weights = sum(path.stat().st_size for pattern in ("*.safetensors", "*.bin") for path in Path(model_path).glob(pattern))
    return torch.float32 if 2 * weights <= available_memory() // 2 else dtype


class ChatEngine:
    """Streams answers; every answer being generated decodes in one batch with the others (see scheduler).

    Each turn reuses what was computed before: with a session id, that session's KV cache up to where the new
    prompt departs from the cached tokens (so regenerate and undo crop it) and its image's vision features; without
    one (API clients, which send the whole conversation each time), the longest matching prefix of any earlier
    answer's cache (see prefix_cache; `prefix_cache_tokens=0` turns it off).

    On CUDA, up to `static_slots` sessions at a time keep their cache in a fixed-address slot of `slot_tokens`
    tokens whose steps replay as CUDA graphs (see static_slots); the others, and conversations longer than a slot,
    use a growing DynamicCache and batched steps. `static_slots=0` turns slots off; on the CPU they are off by
    default and, when asked for, run eagerly (graphs need CUDA)."""

    def __init__(self, model_path: str, device: str | None = None, max_sessions: int = 64, max_cached_tokens: int = 65_536,
                 static_slots: int | None = None, slot_tokens: int = 2048, prefix_cache_tokens: int = 65_536,
                 max_batch: int = 32, max_waiting: int = 256, dtype: str | torch.dtype = "auto"):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model_path = model_path = resolve_checkpoint(model_path)  # a local llava_plugin folder
        dtype = compute_dtype(model_path, self.device, dtype)
        self.model = AutoModel.from_pretrained(model_path, trust_remote_code=True, dtype=dtype).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
        self.prompter = Prompter(self.processor)
        self.sessions = SessionStore(max_sessions, max_cached_tokens)
        text_config = self.model.config.get_text_config()
        self.prefixes = PrefixCache(text_config, self.model.config.image_token_id, prefix_cache_tokens) if prefix_cache_tokens else None
        generation = self.model.generation_config
        self.stop_ids = {generation.eos_token_id} if isinstance(generation.eos_token_id, int) else set(generation.eos_token_id or [])
        self.stop_ids.add(self.processor.tokenizer.eos_token_id)
        self.scheduler = Scheduler(self.model, list(generation.suppress_tokens or []), max_batch, max_waiting)
        self.grammars = Grammars(self.processor.tokenizer, self.scheduler.vocabulary, self.stop_ids)
        # answers' counts for /metrics (each reader thread adds its own answer's at its end)
        self._counts = dict.fromkeys(["requests_finished", "requests_failed", "prompt_tokens", "cached_prompt_tokens",
                                      "generation_tokens"], 0)
        self._counts_lock = threading.Lock()
        on_cuda = torch.device(self.device).type == "cuda"
        static_slots = (4 if on_cuda else 0) if static_slots is None else static_slots
        self.slots = None
        if static_slots > 0 and supports_static_slots(self.model):
            self.slots = SlotPool(self.model, static_slots, slot_tokens, graphs=on_cuda)

    def stream(self, messages: list[dict], image, temperature: float = 0.2, top_p: float = 0.7, max_new_tokens: int = 512,
               session_id: str | None = None) -> Iterator[str]:
        """Yields the growing answer to `messages` (chat-template format, one image part in a user turn; or none, and
        `image` None)."""
        try:
            sampling = Sampling(temperature, top_p, max_new_tokens)
        except ValueError as error:
            raise ChatError(str(error)) from error
        for progress in self.generate(messages, image, sampling, session_id=session_id):
            yield progress.text

    def generate(self, messages: list[dict], image, sampling: Sampling, session_id: str | None = None,
                 stop: tuple[str, ...] = (), interval: float = 0.0, cancel: threading.Event | None = None,
                 prompting: dict | None = None) -> Iterator[Progress]:
        """As `stream`, with the token counts, a seed, and `stop` strings that end the answer (and are cut from it).
        With `interval`, at most one Progress per that many seconds (the end is never held back). Setting `cancel`
        (from any thread) ends the answer at once, also while it waits for a place in the batch. `prompting`:
        Prompter.prompt's options (rendering, salt, keep_last). ChatError at the first read for input we refuse."""
        prompt = self.prompter.prompt(messages, image, **(prompting or {}))
        yield from as_text(self.answer_prompt(prompt, sampling, session_id, interval, cancel), self.processor.tokenizer,
                           stop, chat_context(sampling, prompt), sampling)

    def complete(self, prompt: str | list[int] | Prompt, sampling: Sampling, stop: tuple[str, ...] = (),
                 interval: float = 0.0, cancel: threading.Event | None = None) -> Iterator[Progress]:
        """A text completion: `prompt` (raw text, tokenized as it is without a chat template, or token ids; no images;
        or the Prompt the prompter's text_prompt made of them) continued, its text exactly what follows the prompt (a
        leading space kept, nothing stripped), as OpenAI's and vLLM's /v1/completions return it. ChatError here for
        a prompt we refuse. `cancel`: as generate's."""
        made = prompt if isinstance(prompt, Prompt) else self.prompter.text_prompt(prompt)
        return as_text(self.answer_prompt(made, sampling, interval=interval, cancel=cancel), self.processor.tokenizer, stop,
                       continuation(made.ids[0].tolist()), sampling)

    def generate_tokens(self, messages: list[dict], image, sampling: Sampling, session_id: str | None = None,
                        interval: float = 0.0, cancel: threading.Event | None = None) -> Iterator[Tokens]:
        """The answer's token ids as they come (see answer_text.as_text for its text); closing it early cancels the
        rest, and so does setting `cancel` from another thread (then the answer ends at once, also while it waits
        for a place in the batch, without its prefill). ChatError (at the first read) for input we refuse."""
        yield from self.answer_prompt(self.prompter.prompt(messages, image), sampling, session_id, interval, cancel)

    def answer_prompt(self, prompt: Prompt, sampling: Sampling, session_id: str | None = None, interval: float = 0.0,
                      cancel: threading.Event | None = None) -> Iterator[Tokens]:
        """As generate_tokens, for a prompt already made (by this engine's prompter, or one in another process)."""
        if not session_id:
            yield from self._turn(None, prompt, sampling, interval, cancel)
            return
        session = self.sessions.get(session_id)
        try:
            with session.lock:
                turn = self._turn(session, prompt, sampling, interval, cancel)
                try:
                    yield from turn
                finally:
                    turn.close()  # its own cleanup first: it records what the cache holds
        finally:  # also when the reader stops at the last token or a stop string, and does not read on
            self.sessions.trim(keep=session)

    def reset(self, session_id: str):
        self.sessions.reset(session_id)

    def stats(self) -> dict:
        """The engine's counts so far and its state now (engine.metrics names each); cheap, and it waits for
        nothing but a lock held for a few additions."""
        with self._counts_lock:
            counts = dict(self._counts)
        prefixes = self.prefixes
        return {**counts, **self.scheduler.stats(), "prefix_cache_tokens": prefixes.cached_tokens if prefixes else 0,
                "prefix_cache_entries": len(prefixes) if prefixes else 0}

    def _turn(self, session: Session | None, prompt: Prompt, sampling: Sampling, interval: float,
              cancel: threading.Event | None = None) -> Iterator[Tokens]:
        """One answer, in `session` or (None) as a one-off answer over the prefix cache."""
        key = prompt.key
        if session is not None and key != session.image_key:
            session.forget_image()
            session.image_key = key
        if not prompt.sources:  # a conversation without images needs no features
            have_features = True
        elif session is not None:
            have_features = session.vision_features is not None
        else:
            have_features = self.prefixes is not None and self.prefixes.has_features(key, prompt.salt)
        ids, pixel_values = (prompt.ids, None) if have_features and prompt.ids is not None else self._inputs(prompt)
        ids = ids.to(self.device)
        room = self.processor.tokenizer.model_max_length - ids.shape[1]  # the answer ends where the context does
        if room < min(1, sampling.max_new_tokens):  # a prompt scored only may fill the context
            raise ContextTooLong(f"the conversation is {ids.shape[1]} tokens, the model's whole context: start a new one")
        if outside := [token for token, _ in sampling.logit_bias if not 0 <= token < self.scheduler.vocabulary]:
            raise ChatError(f"logit_bias names the token id {outside[0]}, outside the model's vocabulary")
        if sampling.allowed_token_ids is not None or sampling.min_tokens and sampling.stop_token_ids:
            self._check_token_rules(sampling)
        try:  # compiled here, in the request's thread: the scheduler's only matches
            constraint = self.grammars.constraint(sampling.structure) if sampling.structure is not None else None
        except StructureError as error:
            raise StructureRefused(str(error)) from None
        # a prompt to score is fed in parts (Scheduler._score_ahead), but an image's span whole
        if sampling.prompt_logprobs is not None and prompt.sources and ids.shape[1] * self.scheduler.vocabulary > SCORED_LOGITS:
            most = SCORED_LOGITS // self.scheduler.vocabulary
            raise ChatError(f"the prompt is {ids.shape[1]} tokens with images; every token's log-probability is computed "
                            f"for at most {most} (each position's scores over the {self.scheduler.vocabulary:,}-token "
                            "vocabulary are kept)")
        if sampling.max_new_tokens > room:
            sampling = dataclasses.replace(sampling, max_new_tokens=room, min_tokens=min(sampling.min_tokens, room))
        # AnyRes: the tiles, and so the image tokens, are laid out by the image's size
        anyres = self.model.config.image_grid_pinpoints is not None
        image_sizes = torch.tensor(prompt.sizes, device=self.device) if anyres else None
        one_off = session is None
        if one_off:
            # a prompt to score is fed whole (a cached prefix's positions would have no log-probabilities)
            reuse = self.prefixes is not None and sampling.prompt_logprobs is None
            # a scored prompt reuses nothing but is stored all the same: under its salt too
            session = self.prefixes.session(key, ids[0], prompt.salt) if reuse else Session(image_key=key, salt=prompt.salt)
            if prompt.sources and session.vision_features is None and pixel_values is None:  # forgotten meanwhile
                ids, pixel_values = self._inputs(prompt)
                ids = ids.to(self.device)
            with session.lock:  # a slot's eviction takes only a session whose lock is free
                yield from self._decode(session, ids, pixel_values, image_sizes, sampling, one_off, interval, cancel, constraint)
        else:  # generate holds the session's lock
            yield from self._decode(session, ids, pixel_values, image_sizes, sampling, one_off, interval, cancel, constraint)

    def _check_token_rules(self, sampling: Sampling):
        """TokenRulesRefused (its message begins with the field to blame) where the answer's rules leave no token to
        draw: allowed_token_ids that are all never generated (the model's suppressed tokens) or one-token bad words,
        or, before min_tokens, only end or stop tokens (allowed, or left by stop_token_ids)."""
        vocabulary = self.scheduler.vocabulary
        ruled_out = set(self.scheduler.suppress) | {word[0] for word in sampling.bad_words if len(word) == 1}
        stops = set(sampling.stop_token_ids) | set(self.stop_ids)  # all blocked before min_tokens (Sequence.blocked)
        if sampling.allowed_token_ids is None:  # the whole vocabulary, less what is ruled out and, first, the stops
            if sampling.min_tokens and len({token for token in ruled_out | stops if 0 <= token < vocabulary}) >= vocabulary:
                raise TokenRulesRefused(f"stop_token_ids: with the end tokens and the tokens never generated they are every "
                                        f"token, which min_tokens ({sampling.min_tokens}) keeps from being drawn first")
            return
        left = set(sampling.allowed_token_ids) - ruled_out
        if not left:
            raise TokenRulesRefused("allowed_token_ids: every token it allows is a bad word or one this model never "
                                    "generates (its suppressed tokens)")
        if sampling.min_tokens and not left - stops:
            raise TokenRulesRefused(f"allowed_token_ids: it allows only end or stop tokens, which min_tokens "
                                    f"({sampling.min_tokens}) keeps from being drawn first")

    def _decode(self, session: Session, ids, pixel_values, image_sizes, sampling: Sampling, one_off: bool,
                interval: float, cancel: threading.Event | None, constraint: Constraint | None = None) -> Iterator[Tokens]:
        # a one-off answer takes a slot only without a prefix cache, which keeps DynamicCaches
        scored = sampling.prompt_logprobs is not None  # fed whole, in the batch: see Scheduler._score
        extra = self._reuse(session, ids[0], pixel_values, sampling.max_new_tokens, evict=not one_off,
                            use_slot=not (one_off and self.prefixes is not None) and not scored, whole=scored)
        if extra and image_sizes is not None:
            extra["image_sizes"] = image_sizes
        keep = session.cached_tokens
        sequence = self.scheduler.submit(Sequence(session.cache, ids[:, keep:], extra, sampling, self.stop_ids, cancel,
                                                  prompt=ids[0].tolist() if sampling.repetition_penalty != 1 else None,
                                                  constraint=constraint))
        counts = {"prompt_tokens": ids.shape[1], "cached_tokens": keep}
        told = {"tokens": 0, "prompt": False}

        def tokens(new: list[int], **ending) -> Tokens:  # with what was asked of their log-probabilities
            logprobs = None
            if sampling.logprobs is not None:
                logprobs = sequence.logprobs[told["tokens"]: told["tokens"] + len(new)]
            told["tokens"] += len(new)
            first, told["prompt"] = not told["prompt"], True
            prompt_logprobs = sequence.prompt_logprobs if first else None
            prompt_ids = ids[0].tolist() if first and (sampling.return_token_ids or sampling.prompt_logprobs is not None) else None
            return Tokens(new, logprobs=logprobs, prompt_logprobs=prompt_logprobs, prompt_ids=prompt_ids, **counts, **ending)

        try:
            last = []
            with closing(self.scheduler.tokens(sequence, interval)) as stream:
                try:
                    for arrived, ended in stream:
                        if ended:  # they go with the finish reason (or before the error)
                            last = arrived
                        else:
                            yield tokens(arrived)
                except Exception:
                    if last:
                        yield tokens(last)  # what the answer had before it failed
                    raise
            yield tokens(last, finish_reason=sequence.finish_reason or "stop", ended_by=sequence.ended_by,
                         end_drawn=sequence.end_drawn, stop_reason=sequence.stop_reason, end_token=sequence.end_token)
        finally:
            with self._counts_lock:
                self._counts["requests_failed" if sequence.error is not None else "requests_finished"] += 1
                self._counts["prompt_tokens"] += counts["prompt_tokens"]
                self._counts["cached_prompt_tokens"] += keep
                self._counts["generation_tokens"] += len(sequence.tokens) + sequence.end_drawn  # as usage counts them
            # once `stream` is closed the scheduler has let go: the cache holds the prompt and the tokens fed back
            session.cache = sequence.cache
            if session.cache is None:
                session.drop_cache()  # a step failed half-way: start clean next turn
            else:
                generated = torch.tensor(sequence.tokens, device=ids.device, dtype=ids.dtype)
                session.tokens = torch.cat([ids[0], generated])[: session.cache.get_seq_length()]
            if one_off:
                if self.prefixes is not None:
                    self.prefixes.store(session)
                session.drop_cache()  # frees its slot at once

    def _inputs(self, prompt: Prompt) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's token ids and pixels, for a turn whose images' features are not computed yet."""
        try:
            return self.prompter.inputs(prompt)
        except ChatError:  # too long for the model
            raise
        except ValueError as error:  # the processor's refusal
            raise ChatError(str(error)) from error

    def _reuse(self, session: Session, ids: torch.Tensor, pixel_values: torch.Tensor | None, max_new_tokens: int, evict: bool,
               use_slot: bool = True, whole: bool = False) -> dict:
        """Crops the session's cache to the prefix it shares with `ids` (or gives it a fresh one; always with `whole`,
        for a prompt fed whole); returns the image input the rest needs."""
        keep = 0 if whole else common_prefix(session.tokens, ids)
        image_positions = (ids == self.model.config.image_token_id).nonzero()
        first_image = int(image_positions[0]) if len(image_positions) else None
        if first_image is not None and keep <= int(image_positions[-1]):
            keep = min(keep, first_image)  # an image span is recomputed whole or not at all
        keep = min(keep, len(ids) - 1)  # generate needs at least one new token to run
        fits_a_slot = use_slot and self.slots is not None and len(ids) + max_new_tokens <= self.slots.capacity
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
