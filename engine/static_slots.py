"""Fixed-address KV caches for chat sessions, and the language model's step over them replayed as CUDA graphs.

In eager PyTorch a 7B model's forward costs about the same for 1 token as for 1,000 on an H200: the GPU waits on
the CPU launching a few thousand kernels. A turn that reuses its cache prefills a handful of tokens, so it pays that
launch cost and nothing else. A CUDA graph launches the whole step at once, but it needs fixed tensor addresses and
shapes: each slot holds one session's keys and values in a transformers StaticCache, and each step is padded to one
of a few token counts (BUCKETS), with one graph per slot and count, captured the first time it is needed.
Padding is harmless: the padding tokens sit after the real ones, no real token attends to them, and the next step
overwrites them. Steps with an image, or longer than the largest bucket, run eagerly over the same cache (a whole
prompt through a DynamicCache, whose keys and values are then copied in).
"""

import threading
import time
import warnings
from dataclasses import dataclass

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

BUCKETS = (1, 4, 16, 64, 256)  # token counts of a step; a 7B step costs about the same for any of these on a GPU


@dataclass
class _Step:
    """The fixed input buffers of one bucket's step, and its graph and output once captured."""
    ids: torch.Tensor  # (1, bucket) token ids, padded with whatever the buffer held before
    keep: torch.Tensor  # (1,) the index of the last real token, whose logits are the step's output
    graph: object | None = None
    logits: torch.Tensor | None = None


def supports_static_slots(model) -> bool:
    """Only plain causal attention through SDPA: sliding-window and hybrid layers keep their own, differently indexed,
    caches, and other attention kernels read a boolean mask otherwise (eager adds it to the scores; FlashAttention
    ignores a 4D mask)."""
    config = model.config.get_text_config()
    if model.language_model.config._attn_implementation != "sdpa":
        return False
    cache = StaticCache(config=config, max_cache_len=1)
    return all(type(layer) is StaticLayer for layer in cache.layers)


class StaticSlot:
    """One session's keys and values (at most `capacity` tokens) and the step that extends them. Offers the two
    Cache methods the engine uses (`get_seq_length`, `crop`), so a session holds either this or a DynamicCache."""

    def __init__(self, model, capacity: int, graphs: bool, pool=None):
        config = model.config.get_text_config()
        embeddings = model.get_input_embeddings().weight
        self.model, self.capacity, self.pool = model, capacity, pool
        self.graphs = graphs and embeddings.device.type == "cuda"  # a graph of CPU work would replay nothing
        self.cache = StaticCache(config=config, max_cache_len=capacity)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.cache.early_initialization(1, heads, head_dim, embeddings.dtype, embeddings.device)
        self.length = 0  # tokens whose keys and values are valid; everything after is scratch
        self.owner = None  # the session that holds this slot while owner.cache is this slot
        self.last_used = 0.0
        self.start = torch.zeros((), dtype=torch.long, device=embeddings.device)  # where a step's tokens go
        self.columns = torch.arange(capacity, device=embeddings.device)
        self._steps: dict[int, _Step] = {}

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int):
        """As Cache.crop with a negative count: forgets the last tokens (their buffers are overwritten later)."""
        self.length = max(0, self.length + tokens_to_remove)

    def forward(self, ids: torch.Tensor, image_inputs: dict) -> torch.Tensor:
        """Appends `ids` (1, n) after the cached tokens; returns the logits (1, vocab) of the last of them."""
        start, n = self.length, ids.shape[1]
        if start + n > self.capacity:
            raise ValueError(f"a step of {n} tokens after {start} does not fit this slot's {self.capacity} tokens")
        bucket = next((size for size in BUCKETS if size >= n), None)
        if image_inputs or bucket is None or start + bucket > self.capacity:
            logits = self._exact(ids, start, image_inputs)
        else:
            logits = self._padded(ids, start, bucket)
        self.length = start + n
        self.last_used = time.monotonic()
        return logits

    def _exact(self, ids: torch.Tensor, start: int, image_inputs: dict) -> torch.Tensor:
        if start == 0:
            # A whole prompt (a new conversation): SDPA's causal kernel over its own length rather than an explicit
            # mask over the slot's every position (that prefill measured 58.6 against 53.4 ms at 7B on an H200);
            # its keys and values are copied in after.
            prompt = DynamicCache(config=self.model.config.get_text_config())
            logits = self.model(input_ids=ids, cache=prompt, use_cache=True, logits_to_keep=1, **image_inputs).logits[:, -1]
            for layer, computed in zip(self.cache.layers, prompt.layers):
                layer.keys[:, :, : ids.shape[1]].copy_(computed.keys)
                layer.values[:, :, : ids.shape[1]].copy_(computed.values)
            return logits
        self.start.fill_(start)
        self._seek()
        positions = (start + torch.arange(ids.shape[1], device=ids.device)).unsqueeze(0)
        return self.model(input_ids=ids, cache=self.cache, position_ids=positions, attention_mask=self._mask(positions),
                          use_cache=True, logits_to_keep=1, **image_inputs).logits[:, -1]

    def _padded(self, ids: torch.Tensor, start: int, bucket: int) -> torch.Tensor:
        step = self._steps.get(bucket)
        if step is None:
            step = self._steps[bucket] = _Step(ids=torch.zeros((1, bucket), dtype=torch.long, device=ids.device),
                                               keep=torch.zeros(1, dtype=torch.long, device=ids.device))
        step.ids[:, : ids.shape[1]].copy_(ids)
        step.keep.fill_(ids.shape[1] - 1)
        self.start.fill_(start)  # before any capture: its warm-up runs write scratch at [start, start + bucket)
        if self.graphs and step.graph is None:
            try:
                self._capture(step)
            except Exception as error:  # graphs only save time: a step that cannot be captured runs eagerly
                warnings.warn(f"CUDA graph capture failed ({error}); this slot's steps run eagerly from now on")
                self.graphs = False
        if not self.graphs:
            return self._run(step)[:, -1]
        step.graph.replay()
        return step.logits[:, -1].clone()  # the graphs share one memory pool: the next replay may reuse this memory

    def _capture(self, step: _Step):
        side = torch.cuda.Stream()  # warm-up on a side stream, as CUDA graph capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._run(step)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other sessions' threads may run the vision tower on the GPU meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            step.logits = self._run(step)
        step.graph = graph

    def _run(self, step: _Step) -> torch.Tensor:
        """The step as tensor operations only (no host synchronisation), so that it can be captured."""
        self._seek()
        positions = (self.start + self.columns[: step.ids.shape[1]]).unsqueeze(0)
        embeddings = self.model.get_input_embeddings()(step.ids)
        return self.model.language_model(inputs_embeds=embeddings, position_ids=positions, attention_mask=self._mask(positions),
                                         cache=self.cache, use_cache=True, logits_to_keep=step.keep).logits

    def _seek(self):
        """Points every layer's write position at `start` (StaticLayer writes at its own running length)."""
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(self.start)

    def _mask(self, positions: torch.Tensor) -> torch.Tensor:
        """(1, 1, tokens, capacity): each token sees the cache up to its own position, never the scratch after it."""
        return (self.columns <= positions[0, :, None])[None, None]


class SlotPool:
    """At most `slots` StaticSlots, made when first needed. A session takes a free slot, else the least recently used
    one of an idle session (which loses its cache and recomputes next turn, as when the session store trims it)."""

    def __init__(self, model, slots: int, capacity: int, graphs: bool):
        # padded steps write up to the slot's last position: keep it within the positions the model knows
        capacity = min(capacity, getattr(model.config.get_text_config(), "max_position_embeddings", None) or capacity)
        self.model, self.size, self.capacity, self.graphs = model, slots, capacity, graphs
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self._slots: list[StaticSlot] = []
        self._lock = threading.Lock()

    def acquire(self, session, evict: bool = True) -> StaticSlot | None:
        """Gives `session` (whose lock the caller holds) an empty slot as its cache, and returns it; None when every
        slot is busy. The session takes the slot under the pool's lock: a slot counts as free once its owner's cache
        is something else, so another thread must never see the owner set before the cache."""
        with self._lock:
            slot = session.cache if isinstance(session.cache, StaticSlot) else self._free()
            if slot is None and len(self._slots) < self.size:
                slot = StaticSlot(self.model, self.capacity, self.graphs, self.pool)
                self._slots.append(slot)
            if slot is None and evict:
                slot = self._evict()
            if slot is not None:
                slot.owner, slot.length = session, 0
                session.cache, session.tokens = slot, None
            return slot

    def _free(self) -> StaticSlot | None:
        return next((slot for slot in self._slots if slot.owner is None or slot.owner.cache is not slot), None)

    def _evict(self) -> StaticSlot | None:
        for slot in sorted(self._slots, key=lambda slot: slot.last_used):
            owner = slot.owner
            if owner.lock.acquire(blocking=False):  # a session that is answering keeps its slot
                try:
                    if owner.cache is slot:
                        owner.drop_cache()
                    return slot
                finally:
                    owner.lock.release()
        return None

    def __len__(self) -> int:
        return len(self._slots)
