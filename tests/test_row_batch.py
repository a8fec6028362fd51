"""The scheduler's batches (row_batch, and padded_batch for the models it cannot serve): rows prefilled together
(left-padded to the longest), rows joining with one token left (riders), rows leaving and the last row moving into
their place, buffers growing and shrinking: each row's logits equal one forward over that row's tokens alone, in
SDPA and in eager attention. And a request whose prompt is cached but its last token costs no forward of its own."""

import pytest
import torch
from PIL import Image
from transformers import DynamicCache, LlamaConfig, MistralConfig

from engine import ChatEngine, row_batch
from engine.decoding import Sampling
from engine.padded_batch import PaddedBatch
from engine.row_batch import RowBatch
from engine.scheduler import Scheduler, Sequence
from tiny_components import user_turn

IMAGE = Image.new("RGB", (40, 30), (30, 200, 30))


@pytest.fixture(scope="module")
def engine(saved_checkpoint):
    return ChatEngine(str(saved_checkpoint), device="cpu")


class Rows:
    """Sequences to batch, from (cached prefix length, pending parts: a count of text tokens or "image" for an image's
    span), and each one's tokens so far, to check a batch's logits against one forward over a row's tokens alone."""

    def __init__(self, engine, spec: list[tuple[int, list]], seed: int):
        self.model, image_id = engine.model, engine.model.config.image_token_id
        torch.manual_seed(seed)
        with torch.no_grad():
            features = self.model.get_vision_features(engine.processor.image_processor(IMAGE, return_tensors="pt")["pixel_values"])
        self.sequences, self.full, self.features = [], [], []
        for prefix_length, parts in spec:
            pending = torch.cat([torch.full((1, features.shape[1]), image_id) if part == "image" else torch.randint(3, image_id, (1, part))
                                 for part in parts], 1)
            prefix = torch.randint(3, image_id, (1, prefix_length))
            cache = DynamicCache(config=self.model.config.get_text_config())
            if prefix_length:
                with torch.no_grad():
                    self.model(input_ids=prefix, cache=cache, use_cache=True)
            image_inputs = {"vision_features": features} if "image" in parts else {}
            self.sequences.append(Sequence(cache, pending, image_inputs, Sampling(0.0, 1.0, 8), set()))
            self.full.append(torch.cat([prefix, pending], 1))
            self.features.append(image_inputs.get("vision_features"))

    def check(self, in_order: list, logits: torch.Tensor) -> int:
        """Each sequence's logits (row i of `logits` is in_order[i]'s) against its tokens alone; each then takes its
        greedy token. Returns how many were checked."""
        for row, sequence in enumerate(in_order):
            index = self.sequences.index(sequence)
            with torch.no_grad():
                alone = self.model(input_ids=self.full[index], vision_features=self.features[index]).logits[0, -1]
            torch.testing.assert_close(logits[row], alone, atol=1e-4, rtol=1e-4)
            self.take(index, int(logits[row].argmax()))
        return len(in_order)

    def take(self, index: int, token: int):
        self.sequences[index].tokens.append(token)
        self.full[index] = torch.cat([self.full[index], torch.tensor([[token]])], 1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", [RowBatch, PaddedBatch])
def test_every_row_gets_the_logits_of_its_tokens_alone(engine, kind, attention, monkeypatch):
    """Prefixes of 10, 0 and 20 tokens with 5, 8 + an image and 1 pending prefilled together; a rider joining at
    the second step; the image row leaving at the third (the last row moves into its place); steps of one row
    per buffer step, so the row batch's buffers grow and shrink on the way."""
    monkeypatch.setattr(row_batch, "ROWS_STEP", 1)
    monkeypatch.setattr(row_batch, "COLUMNS_STEP", 2)
    model = engine.model
    batch = kind(model)  # before the switch: the batch reads the attention in use at each forward
    model.set_attn_implementation(attention)
    try:
        rows = Rows(engine, [(10, [5]), (0, [3, "image", 4]), (20, [1]), (7, [1]), (0, [row_batch.RIDE_TOKENS + 1])], seed=0)
        sequences = rows.sequences
        assert batch.riders(sequences[1:]) == (sequences[1:4] if kind is RowBatch else [])  # 65 tokens: prefilled
        with torch.no_grad():
            indices, logits = batch.prefill(sequences[:3])
            assert [batch.rows[index] for index in indices] == sequences[:3]
            checked = 0
            for step in range(4):
                checked += rows.check(batch.rows, logits)  # a rider's first logits are its prompt's last token's
                if step == 0 and kind is RowBatch:
                    batch.ride([sequences[3]])
                elif step == 0:  # the padded batch prefills it
                    _, first = batch.prefill([sequences[3]])
                    checked += rows.check([sequences[3]], first)
                if step == 2:
                    batch.remove([batch.rows.index(sequences[1])])  # the image row leaves with its own cache
                    assert sequences[1].cache.get_seq_length() == rows.full[1].shape[1] - 1
                    assert sequences[1] not in batch.rows and len(batch.rows) == 3
                logits = batch.step()
            assert checked >= 12
            batch.remove(list(range(len(batch.rows))))
            for index in (0, 2, 3):  # each leaver's cache holds every token it fed: the last step fed them all
                assert sequences[index].cache.get_seq_length() == rows.full[index].shape[1]
            if kind is RowBatch:
                assert batch.keys == [] and batch.rows == []  # an empty batch keeps no buffers
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_riders_of_several_tokens_and_an_image_join_a_decoding_batch(engine, attention, monkeypatch):
    """Two rows decoding; then riders join: 5 new tokens after a cached prefix, 3 + an image + 4 with no prefix, and
    one token: the packed step gives every row, old and new, the logits of its tokens alone, and so do the steps
    after (buffers growing on the way)."""
    monkeypatch.setattr(row_batch, "ROWS_STEP", 1)
    monkeypatch.setattr(row_batch, "COLUMNS_STEP", 2)
    model = engine.model
    batch = RowBatch(model)
    model.set_attn_implementation(attention)
    try:
        rows = Rows(engine, [(12, [3]), (0, [6]), (9, [5]), (0, [3, "image", 4]), (4, [1])], seed=1)
        assert batch.riders(rows.sequences) == rows.sequences
        with torch.no_grad():
            _, logits = batch.prefill(rows.sequences[:2])
            for step in range(4):
                rows.check(batch.rows, logits)
                if step == 0:
                    batch.ride(rows.sequences[2:])
                if step == 2:
                    batch.remove([0])
                logits = batch.step()
            assert len(batch.rows) == 4 and batch._unfed == set()
    finally:
        model.set_attn_implementation("sdpa")


def test_a_prefill_that_fails_leaves_the_batch_as_it_was(engine, monkeypatch):
    model = engine.model
    batch = RowBatch(model)
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), cache=cache, use_cache=True)
        _, first = batch.prefill([Sequence(cache, torch.tensor([[8, 9]]), {}, Sampling(0.0, 1.0, 4), set())])
        fed = [5, 6, 7, 8, 9, int(first[0].argmax())]
        batch.rows[0].tokens.append(fed[-1])
        before = batch.step()

        def broken(*args, **kwargs):
            raise RuntimeError("out of memory")

        monkeypatch.setattr(model, "forward", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            batch.prefill([Sequence(DynamicCache(config=model.config.get_text_config()), torch.tensor([[4, 5, 6]]), {},
                                    Sampling(0.0, 1.0, 4), set())])
        monkeypatch.undo()
        assert len(batch.rows) == len(batch.lengths) == 1
        fed.append(int(before[0].argmax()))
        batch.rows[0].tokens.append(fed[-1])
        again = batch.step()
    expected = model(input_ids=torch.tensor([fed])).logits[0, -1]
    torch.testing.assert_close(again[0], expected, atol=1e-4, rtol=1e-4)


def test_models_the_row_batch_cannot_serve_get_the_padded_one(engine):
    assert RowBatch.supports(engine.model)
    engine.model.set_attn_implementation("eager")
    try:
        assert RowBatch.supports(engine.model)
    finally:
        engine.model.set_attn_implementation("sdpa")

    class Stub:  # what supports() reads of a model
        def __init__(self, text_config, attention="sdpa"):
            self.config = type("Config", (), {"get_text_config": lambda self: text_config})()
            self.language_model = type("LM", (), {"config": type("C", (), {"_attn_implementation": attention})()})()

    llama = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    mistral = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            sliding_window=4)
    assert not RowBatch.supports(Stub(mistral)) and not RowBatch.supports(Stub(llama, "flash_attention_2"))
    assert type(Scheduler(engine.model, [])._batch) is RowBatch
    config = engine.model.config.get_text_config()
    head_dim = config.head_dim
    config.head_dim = head_dim * 2  # keys and values unlike what the config says: the buffers would be sized wrong
    try:
        assert not RowBatch.supports(engine.model)
        assert type(Scheduler(engine.model, [])._batch) is PaddedBatch
    finally:
        config.head_dim = head_dim


def test_a_row_starts_clean_whatever_its_former_occupant_left(engine):
    """A broken answer can leave NaN keys in its row (float16 overflow); masked columns still enter attention as
    0 * value, so a sequence later in that row (placed there, or moved into its hole) would answer NaN unless its
    columns past its own tokens are cleared."""
    model = engine.model

    def sequence(tokens: int) -> Sequence:
        return Sequence(DynamicCache(config=model.config.get_text_config()), torch.randint(3, 90, (1, tokens)), {},
                        Sampling(0.0, 1.0, 4), set())

    def step(batch) -> torch.Tensor:
        for row in batch.rows:
            row.tokens.append(7)
        return batch.step()

    with torch.no_grad():
        for broken_row in (1, 0):  # the last row leaves and a new one is placed there; the first leaves and the last moves in
            batch = RowBatch(model)
            batch.prefill([sequence(30), sequence(5)] if broken_row else [sequence(5), sequence(30), sequence(5)])
            for buffer in (*batch.keys, *batch.values):
                buffer[broken_row].fill_(float("nan"))
            batch.remove([broken_row])
            if broken_row:
                batch.prefill([sequence(5)])
            assert not step(batch).isnan().any(), broken_row


def test_a_request_cached_to_its_last_token_makes_no_forward_of_its_own(engine):
    """The second asking of a question finds all of its prompt but the last token in the prefix cache: that token
    is fed by the decode steps (one query per forward, one forward per token of the answer)."""
    messages = [user_turn("What is in the picture?")]
    first = list(engine.generate(messages, IMAGE, Sampling(0.0, 1.0, 6)))[-1]
    queries = []
    hook = engine.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: queries.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        again = list(engine.generate(messages, IMAGE, Sampling(0.0, 1.0, 6)))[-1]
    finally:
        hook.remove()
    assert again.text == first.text and again.cached_tokens == again.prompt_tokens - 1
    assert set(queries) == {1} and len(queries) == again.completion_tokens + (again.finish_reason == "stop")


def test_a_remove_that_fails_half_way_still_ends_the_sequences_it_took_out(engine, monkeypatch):
    """A remove that fails (out of memory shrinking the buffers, or copying a leaver's cache) has already taken
    some leavers out of the batch: the batch's fail no longer sees them, so the scheduler must end them itself, or
    their readers wait forever."""
    from engine.scheduler import Scheduler

    scheduler = Scheduler(engine.model, [])
    batch = scheduler._batch
    assert isinstance(batch, RowBatch)
    sequences = [Sequence(DynamicCache(config=engine.model.config.get_text_config()), torch.tensor([[5, 6, 7]]), {},
                          Sampling(0.0, 1.0, 4), set()) for _ in range(3)]
    with torch.no_grad():
        _, logits = batch.prefill(sequences)
    for sequence, row in zip(sequences, logits):
        sequence.tokens.append(int(row.argmax()))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(batch, "_fit", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        scheduler._leave([0, 2])
    monkeypatch.undo()
    batch.fail(RuntimeError("out of memory"))  # what the scheduler's loop does next
    assert all(sequence.done.is_set() for sequence in sequences)


def test_prompts_past_the_riders_limit_are_prefilled_apart(engine, monkeypatch):
    rows = Rows(engine, [(20, [1]), (20, [30]), (20, [20]), (0, [1])], seed=2)
    monkeypatch.setattr(row_batch, "RIDE_TOKENS", 20)
    assert RowBatch(engine.model).riders(rows.sequences) == [rows.sequences[0], rows.sequences[2], rows.sequences[3]]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_step_scores_each_rider_against_its_own_row_only(engine, attention, monkeypatch):
    """Three rows decoding (the longest 40 tokens) and a rider of 6 new tokens after 10 cached: the decoding rows are
    scored together over their own columns, the rider alone over its 16 (one SDPA over every row's columns end to end
    would score all 9 tokens against 4 x 41 keys), the model's attention is back after the step, and every row's
    logits are those of its tokens alone."""
    model = engine.model
    model.set_attn_implementation(attention)
    try:
        rows = Rows(engine, [(30, [1]), (40, [1]), (12, [1]), (10, [6])], seed=3)
        batch = RowBatch(model)
        calls = []
        attend = row_batch.sdpa_attention_forward if attention == "sdpa" else row_batch._eager_attention(
            next(module for module in model.language_model.modules() if type(module).__name__.endswith("Attention")))

        def counted(module, query, key, value, mask, **kwargs):
            calls.append((tuple(query.shape[:3]), tuple(key.shape[:1]) + tuple(key.shape[2:3])))
            return attend(module, query, key, value, mask, **kwargs)

        monkeypatch.setattr(row_batch, "sdpa_attention_forward" if attention == "sdpa" else "_eager_attention",
                            counted if attention == "sdpa" else lambda module: counted)
        with torch.no_grad():
            _, logits = batch.prefill(rows.sequences[:3])
            rows.check(batch.rows, logits)
            batch.ride(rows.sequences[3:])
            calls.clear()
            logits = batch.step()
        heads = model.config.get_text_config().num_attention_heads
        layers = model.config.get_text_config().num_hidden_layers
        # per layer: (rows, heads, queries) against (rows, columns)
        assert calls == [((3, heads, 1), (3, 42)), ((1, heads, 6), (1, 16))] * layers
        assert model.language_model.config._attn_implementation == attention
        rows.check(batch.rows, logits)
    finally:
        model.set_attn_implementation("sdpa")


def test_a_packed_step_that_fails_gives_the_model_its_attention_back(engine, monkeypatch):
    """Out of memory in a packed step's attention: the error reaches the caller and the model's attention is back (a
    forward under the row attention outside a packed step is refused, not computed from nothing)."""
    model = engine.model
    rows = Rows(engine, [(8, [1]), (6, [4])], seed=4)
    batch = RowBatch(model)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    with torch.no_grad():
        batch.prefill(rows.sequences[:1])
        rows.sequences[0].tokens.append(5)
        batch.ride(rows.sequences[1:])
        monkeypatch.setattr(row_batch, "sdpa_attention_forward", out_of_memory)
        with pytest.raises(RuntimeError, match="out of memory"):
            batch.step()
        assert model.language_model.config._attn_implementation == "sdpa"
        monkeypatch.undo()
        model.language_model.config._attn_implementation_internal = row_batch.ROW_ATTENTION
        try:
            with pytest.raises(RuntimeError, match="packed step only"):
                model(input_ids=torch.tensor([[5, 6]]))
        finally:
            model.language_model.config._attn_implementation_internal = "sdpa"
