"""The batch of decoding sequences in preallocated key/value buffers where each sequence keeps its row from the
step it joins to the step it leaves.

Row i holds its sequence's tokens in columns 0 .. length_i - 1, so a token's column is its position. A decode step
writes every row's new keys and values at that row's own next column (one indexed write per layer), and attention
reads columns 0 .. longest under a 4D mask that hides each row's columns past its length. So joining copies only
the joiner's cached prefix into a free row, leaving copies only the leaver's row out (and the last row into the
hole, which keeps the rows 0 .. n-1), and no step re-pads anything. padded_batch, a DynamicCache left-padded to
the longest row, copied the whole batch once per request joining and once per request leaving, and its steps grew
the cache by concatenation (a copy of every row each step): at eight streams on two CPU cores that was a fifth
of the scheduler's time.

A sequence with at most RIDE_TOKENS of its prompt left to feed (a follow-up whose conversation the prefix cache
holds, a short new question, a retry) needs no forward of its own: it takes its row and the next decode step feeds
those tokens along with every other row's one (`riders`), and its logits there are its first token's, as vLLM's
chunked prefill mixes prompts into decode steps. That step packs every row's tokens into one sequence, and its
attention (`_row_attention`, the model's own attention called per group of rows) scores the one-token rows together
over their rows' columns and each rider's tokens over its own row's only, as a varlen kernel would: one SDPA over the
rows' columns laid end to end scored every token against every row (and copied the buffers per layer to lay them
out). Longer prompts are prefilled first, together, in a forward over their rows only.

Which models: plain full attention through SDPA or eager attention (the mask is built here; transformers builds
the sliding-window and hybrid masks padded_batch relies on for the rest, see `supports`)."""

import sys
from typing import NamedTuple

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .kv_cache import cache_over

ROWS_STEP = 4  # rows are allocated in multiples of this
COLUMNS_STEP = 64  # and columns, with at least this many free past the longest row (a buffer grows rarely)
RIDE_TOKENS = 64  # a prompt with at most this many tokens left to feed joins the next decode step (see riders)
ROW_ATTENTION = "llava_row_batch"  # the attention a packed step runs under (registered below)


class _Write(NamedTuple):
    """Where the forward under way writes and reads: rows first .. end - 1; `rows` and `columns` (B, queries) index
    each query's place, or for a single row `rows` is a slice of columns and `columns` is None; every layer reads
    columns 0 .. width - 1; `queries` per row (in a packed step, B is 1 and the queries are every row's)."""
    first: int
    end: int
    rows: torch.Tensor | slice
    columns: torch.Tensor | None
    width: int
    queries: int

    @property
    def seen(self) -> int:
        """The keys and values a query is scored against (at most: a packed step's queries see their own row's)."""
        return self.width


class _Group(NamedTuple):
    """Queries of a packed step that attend together: `queries` (their places in the packed sequence) of `rows`
    (the buffers' rows), under `mask` (rows, 1, queries per row, columns) in the form the model's attention takes.
    One token per row (the decoding rows), or one row's several (a rider)."""
    queries: slice | torch.Tensor
    rows: slice | torch.Tensor
    mask: torch.Tensor
    one_each: bool


def _eager_attention(module):
    """The eager attention function of `module`'s modeling file (each model's own: some add softcapping or sinks)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def _row_attention(module, query, key, value, attention_mask, row_groups=(), row_attend="sdpa", **kwargs):
    """A packed step's attention: `query` (1, heads, tokens, head dim) holds every row's tokens end to end, `key` and
    `value` are the rows' buffers (rows, kv heads, columns, head dim). Each group's queries go through the model's
    own attention (`row_attend` names it: SDPA or eager, so scaling, GQA and the rest are the model's) over its rows
    only. Returns (1, tokens, heads, head dim), as transformers' attention functions do."""
    if not row_groups:  # a forward under this attention that is not the batch's packed step: it would read nothing
        raise RuntimeError(f"{ROW_ATTENTION} attention runs a RowBatch's packed step only (no row groups given)")
    if row_attend not in ("sdpa", "eager"):
        raise ValueError(f"a packed step runs under SDPA or eager attention, not {row_attend!r}")
    attend = sdpa_attention_forward if row_attend == "sdpa" else _eager_attention(module)
    heads, head_dim = query.shape[1], query.shape[3]
    output = query.new_empty((1, query.shape[2], heads, head_dim))
    for group in row_groups:
        queries = query[0, :, group.queries]  # (heads, n, head dim)
        queries = queries.transpose(0, 1)[:, :, None] if group.one_each else queries[None]
        width = group.mask.shape[-1]
        attended, _ = attend(module, queries, key[group.rows, :, :width], value[group.rows, :, :width], group.mask, **kwargs)
        output[0, group.queries] = attended.reshape(-1, heads, head_dim)
    return output, None


AttentionInterface.register(ROW_ATTENTION, _row_attention)


class RowBatch:
    """The sequences decoding together (scheduler.Sequence): `rows[i]` owns row i of `keys[layer]` and
    `values[layer]` ((rows, kv heads, columns, head dim)), whose first `lengths[i]` columns hold its tokens."""

    def __init__(self, model):
        self.model, self.config = model, model.config.get_text_config()
        embeddings = model.get_input_embeddings().weight
        self.device, self.dtype = embeddings.device, embeddings.dtype
        self.heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
        self.head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        self.rows: list = []
        self.lengths: list[int] = []
        self._unfed: set = set()  # rows that joined by riding: the next step feeds the rest of their prompts
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._capacity = (0, 0)  # rows and columns every buffer has (0, 0 while a resize is under way or failed)
        self._cache = Cache(layers=[_RowLayer(self, layer) for layer in range(self.config.num_hidden_layers)])
        self._write: _Write | None = None  # the forward under way

    @staticmethod
    def supports(model) -> bool:
        """Every layer of the model's caches is plain (no sliding window, no linear attention: their masks and caches
        are not one set of columns per row), its attention takes a 4D mask (SDPA, eager), and its keys and values
        have the heads and head size its config says (which size the buffers; a one-token forward shows them)."""
        config = model.config.get_text_config()
        attention = model.language_model.config._attn_implementation
        if attention not in ("sdpa", "eager"):
            return False
        if attention == "eager" and not all(_eager_attention(module) for module in model.language_model.modules()
                                            if type(module).__name__.endswith("Attention")):
            return False  # a packed step calls the modeling file's eager function per group of rows
        cache = DynamicCache(config=config)
        if not all(type(layer) is DynamicLayer for layer in cache.layers):
            return False
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        device = model.get_input_embeddings().weight.device
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), cache=cache, use_cache=True, logits_to_keep=1)
        return all(layer.keys.shape[1] == heads and layer.keys.shape[3] == layer.values.shape[3] == head_dim
                   for layer in cache.layers)

    def riders(self, sequences: list) -> list:
        """Those of the arriving sequences that join with the rest of their prompt fed by the next decode step: those
        with at most RIDE_TOKENS left (images included; a rider's tokens are scored against its own row only, so
        riding costs what its prefill would, less that forward's fixed cost). Longer prompts are prefilled apart,
        so that one long prompt does not hold up every row's next token."""
        return [sequence for sequence in sequences if sequence.pending.shape[1] <= RIDE_TOKENS]

    def ride(self, sequences: list):
        """Takes in `riders`; their first token comes from the next `step`. If it fails, the batch is
        as it was."""
        first = len(self.rows)
        try:
            self._place(sequences)
        except BaseException:
            del self.rows[first:], self.lengths[first:]
            raise
        self._unfed.update(sequences)

    def prefill(self, sequences: list, every_position: bool = False) -> tuple[list[int], torch.Tensor | list[torch.Tensor]]:
        """Takes in the sequences and feeds each one's pending tokens after its cached prefix in one forward over
        their rows; returns their rows and the logits (B, vocab) after each one's last token, or with
        `every_position` per sequence the logits (its pending tokens, vocab) after each of its tokens. If it fails,
        the batch is as it was."""
        first = len(self.rows)
        try:
            self._place(sequences)
            logits = self._prefill(first, sequences, every_position)
        except BaseException:
            del self.rows[first:], self.lengths[first:]
            raise
        return list(range(first, first + len(sequences))), logits

    def _prefill(self, first: int, sequences: list, every_position: bool = False) -> torch.Tensor | list[torch.Tensor]:
        # Rows with fewer pending tokens than the longest are left-padded, so that every row's last token is the
        # last query (logits_to_keep=1). A padding query writes its keys and values into the column just past its
        # row's tokens (which the next step overwrites, and no real query sees) and attends to what the row's first
        # new token does: a query that attends to nothing gives NaN, which would reach the real tokens through that
        # column's values (0 * NaN).
        counts = [sequence.pending.shape[1] for sequence in sequences]
        queries = max(counts)
        ids = torch.zeros((len(sequences), queries), dtype=torch.long)  # 0 is never the image token
        columns = torch.zeros((len(sequences), queries), dtype=torch.long)
        attend = torch.zeros((len(sequences), queries), dtype=torch.long)
        for row, (sequence, count) in enumerate(zip(sequences, counts)):
            start, pad = self.lengths[first + row], queries - count
            ids[row, pad:] = sequence.pending[0].cpu()
            columns[row, pad:] = attend[row, pad:] = torch.arange(start, start + count)
            columns[row, :pad], attend[row, :pad] = start + count, start
        width = max(self.lengths[first + row] + count + (count < queries) for row, count in enumerate(counts))
        # the images' features in row order, as merge_image_features fills the image tokens row after row
        features = [sequence.image_inputs["vision_features"] for sequence in sequences if sequence.image_inputs]
        extra = {"vision_features": torch.cat(features)} if features else {}
        sizes = [sequence.image_inputs["image_sizes"] for sequence in sequences if "image_sizes" in sequence.image_inputs]
        if sizes:  # AnyRes: each image's size lays out its tiles
            extra["image_sizes"] = torch.cat(sizes)
        logits = self._forward(first, ids, columns, attend, width, padded=any(count < queries for count in counts),
                               every_position=every_position, **extra)
        if every_position:  # each row's own queries: the last `count` (the padding is on the left)
            logits = [logits[row, queries - count:] for row, count in enumerate(counts)]
        for row, (sequence, count) in enumerate(zip(sequences, counts)):
            self.lengths[first + row] += count
            sequence.image_inputs = {}
        return logits

    def step(self) -> torch.Tensor:
        """Feeds every row's next input token, and a rider's whole rest of its prompt; returns the logits (B, vocab)
        after each row's last token."""
        if any(row.pending.shape[1] > 1 or row.image_inputs for row in self.rows if row in self._unfed):
            return self._packed_step()
        self._unfed.clear()
        width = max(self.lengths) + 1
        self._fit(len(self.rows), width)
        ids = torch.tensor([[row.next_input] for row in self.rows])
        columns = torch.tensor(self.lengths)[:, None]
        logits = self._forward(0, ids, columns, columns, width, padded=len(set(self.lengths)) > 1)
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    def _packed_step(self) -> torch.Tensor:
        """A step that feeds some rows several tokens: all rows' tokens in one sequence (no padding), token t of row
        r at position and column lengths[r] + t, scored against row r's columns only (see _row_attention)."""
        feeds = [row.pending[0].cpu() if row in self._unfed else torch.tensor([row.next_input]) for row in self.rows]
        counts = [len(feed) for feed in feeds]
        count, width = len(self.rows), max(length + fed for length, fed in zip(self.lengths, counts))
        self._fit(count, width)
        device = self.device
        rows = torch.repeat_interleave(torch.arange(count), torch.tensor(counts)).to(device)
        columns = torch.cat([torch.arange(length, length + fed) for length, fed in zip(self.lengths, counts)]).to(device)
        # the images' features in the order their tokens come, as merge_image_features fills them
        riders = [row for row in self.rows if row in self._unfed and row.image_inputs]
        extra = {"vision_features": torch.cat([row.image_inputs["vision_features"] for row in riders])} if riders else {}
        sizes = [row.image_inputs["image_sizes"] for row in riders if "image_sizes" in row.image_inputs]
        if sizes:  # AnyRes: each image's size lays out its tiles
            extra["image_sizes"] = torch.cat(sizes)
        last = torch.tensor(counts).cumsum(0) - 1  # each row's last token: its logits are the row's next token's
        groups = self._groups(counts)  # the masks in the form the model's attention takes, before it is switched
        rows, columns = rows[None], columns[None]
        self._write = _Write(0, count, rows, columns, width, rows.shape[1])
        config = self.model.language_model.config
        attention = config._attn_implementation
        if attention not in ("sdpa", "eager"):  # changed since the batch was chosen (supports)
            raise ValueError(f"the row batch's packed step needs SDPA or eager attention; the model now has {attention!r}")
        # for this forward only (the scheduler's thread is the only one running the language model)
        config._attn_implementation_internal = ROW_ATTENTION
        try:
            logits = self.model(input_ids=torch.cat(feeds)[None].to(device), cache=self._cache, position_ids=columns,
                                use_cache=True, logits_to_keep=last.to(device), row_groups=groups,
                                row_attend=attention, **extra).logits[0]
        finally:
            config._attn_implementation_internal = attention
            self._write = None
        for row in riders:
            row.image_inputs = {}
        self.lengths = [length + fed for length, fed in zip(self.lengths, counts)]
        self._unfed.clear()
        return logits

    def _groups(self, counts: list[int]) -> list[_Group]:
        """A packed step's attention groups: every row fed one token, together; each row fed several, alone."""
        device, groups, ends = self.device, [], torch.tensor(counts).cumsum(0).tolist()
        single = [row for row, fed in enumerate(counts) if fed == 1]
        if single:
            width = max(self.lengths[row] for row in single) + 1
            lengths = torch.tensor([self.lengths[row] for row in single], device=device)
            seen = torch.arange(width, device=device)[None, :] <= lengths[:, None]  # (rows, width)
            if single == list(range(single[0], single[-1] + 1)):  # consecutive rows, one token each: slices, no copy
                queries, rows = slice(ends[single[0]] - 1, ends[single[-1]]), slice(single[0], single[-1] + 1)
            else:
                queries = torch.tensor([ends[row] - 1 for row in single], device=device)
                rows = torch.tensor(single, device=device)
            groups.append(_Group(queries, rows, self._mask(seen[:, None, None]), one_each=True))
        for row, fed in enumerate(counts):
            if fed > 1:
                start = self.lengths[row]
                seen = torch.arange(start + fed, device=device)[None, :] <= torch.arange(start, start + fed, device=device)[:, None]
                groups.append(_Group(slice(ends[row] - fed, ends[row]), slice(row, row + 1), self._mask(seen[None, None]), one_each=False))
        return groups

    def remove(self, leaving: list[int]):
        """Takes rows out; each leaving sequence gets its own cache back (a copy: the row is reused). The last row
        moves into each hole."""
        for index in sorted(set(leaving), reverse=True):  # from the end: the row moved in is never one still to leave
            length, last = self.lengths[index], len(self.rows) - 1
            self._unfed.discard(self.rows[index])
            self.rows[index].cache = cache_over(self.config, [
                (keys[index: index + 1, :, :length].clone(), values[index: index + 1, :, :length].clone())
                for keys, values in zip(self.keys, self.values)])
            if index != last:
                moved = self.lengths[last]
                for buffer in (*self.keys, *self.values):
                    buffer[index, :, :moved] = buffer[last, :, :moved]
                    buffer[index, :, moved:] = 0  # likewise the leaver's columns
                self.rows[index], self.lengths[index] = self.rows[last], moved
            self.rows.pop()
            self.lengths.pop()
        self._fit(len(self.rows), max(self.lengths, default=0))

    def fail(self, error: BaseException):
        for row in self.rows:
            row.finish(error)
        self.rows, self.lengths, self._unfed = [], [], set()
        self.keys, self.values, self._capacity = [], [], (0, 0)  # whatever a failed forward left in them goes too

    def _place(self, sequences: list):
        """Gives each sequence the next free row and copies its cached prefix in."""
        starts = [sequence.cache.get_seq_length() for sequence in sequences]
        longest = max(start + sequence.pending.shape[1] for start, sequence in zip(starts, sequences))
        self._fit(len(self.rows) + len(sequences), max([longest, *self.lengths]) + 1)
        for sequence, start in zip(sequences, starts):
            row = len(self.rows)
            for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
                if start:
                    cached = sequence.cache.layers[layer]
                    keys[row, :, :start], values[row, :, :start] = cached.keys[0], cached.values[0]
                keys[row, :, start:], values[row, :, start:] = 0, 0  # a NaN a former row left would reach it as 0 * NaN
            self.rows.append(sequence)
            self.lengths.append(start)
            sequence.cache = None  # its keys and values live in the batch until it leaves

    def _fit(self, rows: int, columns: int):
        """Buffers for at least `rows` rows of `columns` columns: grown to the next multiple of the steps (with
        COLUMNS_STEP free past `columns`), shrunk when over twice that (a long conversation left), dropped when
        the batch is empty. Growing or shrinking copies the rows in use."""
        if not rows:
            self.keys, self.values, self._capacity = [], [], (0, 0)
            return
        want_rows = -(-rows // ROWS_STEP) * ROWS_STEP
        want_columns = -(-(columns + COLUMNS_STEP) // COLUMNS_STEP) * COLUMNS_STEP
        have_rows, have_columns = self._capacity
        if rows <= have_rows <= 2 * want_rows and columns <= have_columns <= 2 * want_columns:
            return
        layers = self.config.num_hidden_layers
        if not self.keys:
            self.keys, self.values = [None] * layers, [None] * layers
        self._capacity = (0, 0)  # until every buffer is resized: one that failed half-way is done again, whole
        kept = min(len(self.rows), rows)
        used = max(self.lengths[:kept], default=0)
        shape = (want_rows, self.heads, want_columns, self.head_dim)
        # one buffer at a time, each old one freed as its copy is made: a resize needs one layer's buffer more, not
        # twice the batch's memory. Zeros, not empty: a masked column still enters attention as 0 * value, and
        # uninitialized memory can be NaN.
        for buffers in (self.keys, self.values):
            for layer in range(layers):
                fresh = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if buffers[layer] is not None:
                    fresh[:kept, :, :used] = buffers[layer][:kept, :, :used]
                buffers[layer] = fresh
        self._capacity = (want_rows, want_columns)

    def _forward(self, first: int, ids: torch.Tensor, columns: torch.Tensor, attend: torch.Tensor, width: int,
                 padded: bool, every_position: bool = False, **extra) -> torch.Tensor:
        """One forward over rows first .. first + B - 1: query j of row i is token ids[i, j] at position and column
        columns[i, j], seeing columns 0 .. attend[i, j] (all three (B, queries), on the CPU). Returns the last query's
        logits per row, or with `every_position` every query's (B, queries, vocab)."""
        count, queries = ids.shape
        start = int(columns[0, 0])  # read on the CPU: on a GPU, reading it would wait for the device
        ids, columns, attend = ids.to(self.device), columns.to(self.device), attend.to(self.device)
        if count == 1 and not padded:  # one row, consecutive columns: a slice to write, and no mask (SDPA's causal kernel)
            self._write = _Write(first, first + 1, slice(start, start + queries), None, width, queries)
            mask = None
        else:
            rows = torch.arange(first, first + count, device=self.device)[:, None].expand(count, queries)
            self._write = _Write(first, first + count, rows, columns, width, queries)
            seen = torch.arange(width, device=self.device)[None, None, :] <= attend[:, :, None]  # (B, queries, width)
            mask = self._mask(seen[:, None])
        try:
            logits = self.model(input_ids=ids, cache=self._cache, attention_mask=mask, position_ids=columns, use_cache=True,
                                logits_to_keep=0 if every_position else 1, **extra).logits
            return logits if every_position else logits[:, -1]
        finally:
            self._write = None

    def _mask(self, seen: torch.Tensor) -> torch.Tensor:
        """The 4D mask the attention in use takes for `seen` (True: attended): SDPA a boolean one, eager attention one
        it adds to the scores."""
        if self.model.language_model.config._attn_implementation == "eager":
            return torch.zeros(seen.shape, dtype=self.dtype, device=self.device).masked_fill_(~seen, torch.finfo(self.dtype).min)
        return seen

    def _update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's new keys and values (B, kv heads, queries, head dim) into their rows and columns; returns the
        rows' columns 0 .. width - 1 to attend over."""
        first, end, rows, columns, width, _ = self._write
        if keys.shape[1] != self.heads or keys.shape[3] != self.head_dim or values.shape[3] != self.head_dim:
            raise ValueError(f"layer {layer}'s keys are {tuple(keys.shape)}, but the batch's buffers were sized for "
                             f"{self.heads} heads of {self.head_dim} from the model's config")
        if columns is None:  # one row: `rows` is its slice of columns
            self.keys[layer][first, :, rows] = keys[0]
            self.values[layer][first, :, rows] = values[0]
        else:
            self.keys[layer][rows, :, columns] = keys.transpose(1, 2)
            self.values[layer][rows, :, columns] = values.transpose(1, 2)
        return self.keys[layer][first:end, :, :width], self.values[layer][first:end, :, :width]


class _RowLayer(CacheLayerMixin):
    """One layer of the cache a RowBatch forward runs on: what transformers asks a cache layer, answered by the
    batch."""

    is_sliding = False
    is_croppable = False

    def __init__(self, batch: RowBatch, layer: int):
        super().__init__()
        self.batch, self.layer, self.is_initialized = batch, layer, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the batch sizes its buffers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch._update(self.layer, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.batch._write.seen, 0  # keys and values as wide as the forward reads, from column 0

    def get_seq_length(self) -> int:
        """The tokens before this forward's queries (transformers' causal mask for one row without padding)."""
        if self.batch._write is None:
            return max(self.batch.lengths, default=0)
        return self.batch._write.seen - self.batch._write.queries

    def get_max_length(self) -> int:
        return -1
