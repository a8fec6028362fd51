import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch

import pytest
from PIL import Image
from transformers import DynamicCache

from engine import ChatEngine, ChatError
from engine.decoding import Sampling
from engine.sessions import Session
from engine.static_slots import BUCKETS, StaticSlot, supports_static_slots
from llava_plugin import llava_v1_chat_template
from tiny_components import user_turn

IMAGE = Image.new("RGB", (40, 30), (30, 200, 30))


@pytest.fixture(scope="module")
def engine(saved_checkpoint):
    return ChatEngine(str(saved_checkpoint), device="cpu")


def test_stream_grows_to_the_greedy_answer(engine):
    messages = [user_turn("What is in the picture?")]
    chunks = list(engine.stream(messages, IMAGE, temperature=0.0, max_new_tokens=10))
    assert chunks and all(later.startswith(earlier) for earlier, later in zip(chunks, chunks[1:]))
    prompt = engine.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = engine.processor(images=IMAGE, text=prompt, return_tensors="pt")
    ids = engine.model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert chunks[-1] == engine.processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_unreadable_image_and_overlong_chat_are_chat_errors(engine, tmp_path):
    bogus = tmp_path / "x.png"
    bogus.write_bytes(b"\x89PNG broken")
    with pytest.raises(ChatError, match="x.png"):
        list(engine.stream([user_turn("Hi")], str(bogus)))
    with pytest.raises(ChatError, match="context"):
        list(engine.stream([user_turn("shape " * 400)], IMAGE))


def test_a_failing_step_is_raised_and_the_session_starts_clean(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    list(engine.stream([user_turn("Hi")], IMAGE, max_new_tokens=2, session_id="carol"))
    monkeypatch.setattr(engine.model, "forward", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(engine.stream([user_turn("Hi there")], IMAGE, session_id="carol"))
    assert engine.sessions.get("carol").cache is None


def test_a_bug_after_a_prefill_fails_its_answer_once_and_the_next_goes_on(engine, monkeypatch):
    """An error of ours while an arrival's first token is drawn (after its prefill took it into the batch): the
    scheduler's handler reaches it both as an arrival and as a row; it ends once, with the error (a second end
    reached its reader as a token, a TypeError in the text)."""
    from engine import scheduler as scheduling

    real, calls = scheduling.next_tokens, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("a bug")
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduling, "next_tokens", failing_once)
    with pytest.raises(KeyError, match="a bug"):
        list(engine.stream([user_turn("Hi")], IMAGE, max_new_tokens=3))
    assert answer(engine, [user_turn("Hi")]) is not None


def record_calls(engine):
    prefills, tower = [], []
    hooks = [
        engine.model.language_model.register_forward_pre_hook(lambda m, a, k: prefills.append(k["inputs_embeds"].shape[1]), with_kwargs=True),
        engine.model.vision_tower.register_forward_hook(lambda *args: tower.append(1)),
    ]
    return prefills, tower, hooks


def answer(engine, messages, image=IMAGE, session=None):
    return list(engine.stream(messages, image, temperature=0.0, max_new_tokens=6, session_id=session))[-1]


def three_turns(engine, session: str) -> tuple[list[int], int, str]:
    """A session's three turns, each checked against a full recompute: each turn's first prefill length, how often
    the tower ran, and the last prompt."""
    prefills, tower, hooks = record_calls(engine)
    messages, first_prefills = [user_turn("What is in the picture?")], []
    try:
        for turn in range(3):
            prefills.clear()
            reply = answer(engine, messages, session=session)
            first_prefills.append(prefills[0])
            assert reply == answer(engine, messages)  # no session: everything recomputed
            messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"And then {turn}?"}]
    finally:
        for hook in hooks:
            hook.remove()
    return first_prefills, len(tower), engine.processor.apply_chat_template(messages[:-2], add_generation_prompt=True)


def test_later_turns_prefill_only_the_new_tokens_and_match_a_full_recompute(saved_checkpoint):
    engine = ChatEngine(str(saved_checkpoint), device="cpu", prefix_cache_tokens=0)  # one-off answers recompute all
    first_prefills, tower_runs, prompt = three_turns(engine, "alice")
    full_prompt = engine.processor(images=IMAGE, text=prompt)
    assert first_prefills[0] > 16 and max(first_prefills[1:]) < len(full_prompt["input_ids"][0]) // 2
    assert tower_runs == 1 + 3  # once for the session, once per recompute


@pytest.mark.parametrize("static_slots", [0, 2])
def test_a_template_that_moves_the_image_to_the_newest_question_still_reuses_the_cache_and_the_features(saved_checkpoint, tmp_path, static_slots):
    """Each turn's prompt differs from the last one's from where the image was: the cache is cropped there, the
    image's features come from the session, and answers still equal a full recompute. With slots, the image's
    span is an eager step in the middle of a slot."""
    folder = tmp_path / "image-after-text"
    shutil.copytree(saved_checkpoint, folder)
    (folder / "chat_template.jinja").write_text(llava_v1_chat_template("Shapes.", image_after_text=True))
    engine = ChatEngine(str(folder), device="cpu", static_slots=static_slots, prefix_cache_tokens=0)
    first_prefills, tower_runs, prompt = three_turns(engine, "dora")
    assert prompt.endswith("And then 1?\n<image> ASSISTANT:")
    full_prompt = engine.processor(images=IMAGE, text=prompt)
    # the last turn recomputed from the end of the question before it: not the system prompt, nor the first turn
    assert first_prefills[-1] < len(full_prompt["input_ids"][0]) - 16
    assert tower_runs == 1 + 3


def test_regenerate_and_undo_crop_the_cache(saved_checkpoint):
    engine = ChatEngine(str(saved_checkpoint), device="cpu")
    first = [user_turn("What is in the picture?")]
    reply = answer(engine, first, session="bob")
    longer = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    answer(engine, longer, session="bob")
    prefills, tower, hooks = record_calls(engine)
    try:
        assert answer(engine, first, session="bob") == reply  # undo the second turn, then regenerate the first
    finally:
        for hook in hooks:
            hook.remove()
    assert prefills[0] == 1 and tower == []  # all but the last prompt token came from the cache, no tower run


def test_a_new_image_starts_over_and_caches_stay_bounded(saved_checkpoint):
    engine = ChatEngine(str(saved_checkpoint), device="cpu", max_cached_tokens=150)
    other = Image.effect_noise((50, 50), 90).convert("RGB")
    for name in ("a", "b", "c"):
        answer(engine, [user_turn("What is in the picture?")], session=name)
    assert engine.sessions.cached_tokens <= 150  # older sessions lost their caches, least recently used first
    _, tower, hooks = record_calls(engine)
    try:
        assert answer(engine, [user_turn("What is in the picture?")], image=other, session="a") == answer(
            engine, [user_turn("What is in the picture?")], image=other)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(tower) == 2  # the new image was encoded for the session (and for the recompute)


def test_a_reader_that_stops_early_stops_decoding_and_keeps_the_cache(saved_checkpoint):
    engine = ChatEngine(str(saved_checkpoint), device="cpu")
    prefills, _, hooks = record_calls(engine)
    try:
        stream = engine.stream([user_turn("What is in the picture?")], IMAGE, temperature=0.0, max_new_tokens=50, session_id="dan")
        next(stream)
        stream.close()  # what Gradio does on Stop
        steps = len(prefills)  # the scheduler may have decoded a few tokens ahead of the reader, no more
        session = engine.sessions.get("dan")
        assert steps < 50 and session.cache is not None and session.cached_tokens == session.cache.get_seq_length()
        assert len(prefills) == steps  # closed: nothing decodes for it any more
        prefills.clear()
        answer(engine, [user_turn("What is in the picture?")], session="dan")
        assert prefills[0] == 1  # the stopped turn's prompt was reused
    finally:
        for hook in hooks:
            hook.remove()


def conversation(engine, session: str, turns: int = 3, max_new_tokens: int = 6) -> list[str]:
    messages, replies = [user_turn("What is in the picture?")], []
    for turn in range(turns):
        replies.append(list(engine.stream(messages, IMAGE, temperature=0.0, max_new_tokens=max_new_tokens, session_id=session))[-1])
        messages += [{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": f"And then {turn}?"}]
    return replies


@pytest.fixture(scope="module")
def dynamic_replies(engine):
    return conversation(engine, "reference")


def test_static_slots_answer_as_the_dynamic_cache_does_with_padded_steps(saved_checkpoint, dynamic_replies):
    """Slots run eagerly on the CPU, so this checks their bookkeeping (write positions, masks, padding to the
    buckets, logits of the last real token); test_engine_cuda checks the same replayed as CUDA graphs."""
    engine = ChatEngine(str(saved_checkpoint), device="cpu", static_slots=2)
    prefills, tower, hooks = record_calls(engine)
    try:
        assert conversation(engine, "alice") == dynamic_replies
        assert conversation(engine, "alice") == dynamic_replies  # the same turns again: undo and regenerate over a slot
    finally:
        for hook in hooks:
            hook.remove()
    assert isinstance(engine.sessions.get("alice").cache, StaticSlot) and len(engine.slots) == 1
    assert set(prefills[1:]) <= set(BUCKETS) and prefills.count(1) > 10  # every step after the image prefill is padded
    assert len(tower) == 1
    assert answer(engine, [user_turn("What is in the picture?")]) == dynamic_replies[0]  # one-off: the prefix cache's
    assert len(engine.slots) == 1 and len(engine.prefixes) == 1  # DynamicCache, batched, not a slot
    no_prefixes = ChatEngine(str(saved_checkpoint), device="cpu", static_slots=1, prefix_cache_tokens=0)
    assert answer(no_prefixes, [user_turn("What is in the picture?")]) == dynamic_replies[0]  # a one-off answer, own slot
    assert len(no_prefixes.slots) == 1 and no_prefixes.slots.acquire(Session(), evict=False) is not None  # and freed it


def test_more_sessions_than_slots_take_turns_and_still_answer_the_same(saved_checkpoint, dynamic_replies):
    engine = ChatEngine(str(saved_checkpoint), device="cpu", static_slots=1)
    _, tower, hooks = record_calls(engine)
    try:
        messages = {name: [user_turn("What is in the picture?")] for name in ("a", "b")}
        for turn in range(2):
            for name in ("a", "b"):  # each turn takes the slot from the other, idle, session
                reply = answer(engine, messages[name], session=name)
                assert reply == dynamic_replies[turn]
                messages[name] += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"And then {turn}?"}]
    finally:
        for hook in hooks:
            hook.remove()
    assert len(engine.slots) == 1 and len(tower) == 2  # the evicted session recomputed from its kept vision features


def test_a_conversation_that_outgrows_its_slot_goes_on_in_a_dynamic_cache(saved_checkpoint, dynamic_replies):
    engine = ChatEngine(str(saved_checkpoint), device="cpu", static_slots=1, slot_tokens=110)
    first = [user_turn("What is in the picture?")]
    assert answer(engine, first, session="eve") == dynamic_replies[0]
    assert isinstance(engine.sessions.get("eve").cache, StaticSlot)
    assert conversation(engine, "eve") == dynamic_replies
    assert isinstance(engine.sessions.get("eve").cache, DynamicCache)


def test_a_slot_has_one_session_and_a_busy_session_keeps_its_slot(saved_checkpoint):
    engine = ChatEngine(str(saved_checkpoint), device="cpu", static_slots=1)
    owner, other = Session(), Session()
    with owner.lock:  # answering: the slot became its cache inside acquire, so no other thread can take it
        slot = engine.slots.acquire(owner)
        assert owner.cache is slot and engine.slots.acquire(other) is None
    assert engine.slots.acquire(other) is slot and other.cache is slot and owner.cache is None


def test_slots_need_sdpa_attention(engine):
    """Eager attention adds the boolean mask to the scores instead of masking with it: no slots then."""
    assert supports_static_slots(engine.model)
    engine.model.set_attn_implementation("eager")
    try:
        assert not supports_static_slots(engine.model)
    finally:
        engine.model.set_attn_implementation("sdpa")


def test_a_slot_whose_graph_cannot_be_captured_steps_eagerly(engine, monkeypatch):
    """A capture that fails (here: made to fail) leaves a warning and eager steps with the same logits."""
    def fail(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    ids = torch.randint(0, engine.model.config.image_token_id, (1, 12))
    with torch.no_grad():
        reference = engine.model(input_ids=ids).logits[0]
        slot = StaticSlot(engine.model, capacity=32, graphs=True)
        assert not slot.graphs  # a CPU model: nothing to capture
        slot.graphs = True  # as on CUDA
        monkeypatch.setattr(slot, "_capture", fail)
        with pytest.warns(UserWarning, match="capture failed"):
            first = slot.forward(ids[:, :9], {})  # padded to 16: the graph's capture fails
        assert not slot.graphs
        second = slot.forward(ids[:, 9:], {})
    torch.testing.assert_close(first[0], reference[8], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(second[0], reference[11], atol=1e-4, rtol=1e-4)


def test_slot_steps_give_the_logits_of_one_full_forward(engine):
    """Chunks of every kind (padded to a bucket, exact at the slot's end), then a crop and other chunks over the
    left-over scratch: each chunk's last logits equal those of the same position in one forward over everything."""
    torch.manual_seed(0)
    ids = torch.randint(0, engine.model.config.image_token_id, (1, 40))
    with torch.no_grad():
        reference = engine.model(input_ids=ids).logits[0]
        slot = StaticSlot(engine.model, capacity=42, graphs=False)
        # first pass: the last chunk (16 tokens padded, from 30) would overrun the slot, so it runs exact
        for kept, sizes in ((0, [17, 1, 3, 9, 10]), (5, [2, 30, 3])):
            slot.crop(kept - slot.get_seq_length())
            end = kept
            for size in sizes:
                logits = slot.forward(ids[:, end: end + size], {})
                end += size
                torch.testing.assert_close(logits[0], reference[end - 1], atol=1e-4, rtol=1e-4)
            assert slot.get_seq_length() == end == 40


def test_a_prompt_lays_out_the_processors_tokens_without_its_pixels(engine):
    """The tokens a turn uses when the image's features are cached equal the processor's; sent to another process,
    a prompt leaves its decoded images behind and its sources give the same pixels there."""
    import pickle

    messages = [user_turn("What is in the picture?"), {"role": "assistant", "content": "A square."}, {"role": "user", "content": "Why?"}]
    prompt = engine.prompter.prompt(messages, IMAGE)
    text = engine.processor.apply_chat_template(messages, add_generation_prompt=True)
    expected = engine.processor(images=IMAGE, text=text, return_tensors="pt")
    assert prompt.text == text and prompt.ids.tolist() == expected["input_ids"].tolist()
    assert prompt.sizes == [(IMAGE.height, IMAGE.width)] and prompt.images is not None
    sent = pickle.loads(pickle.dumps(prompt))
    assert sent.images is None and torch.equal(sent.ids, prompt.ids) and sent.key == prompt.key
    ids, pixels = engine.prompter.inputs(sent)
    assert torch.equal(ids, expected["input_ids"]) and torch.equal(pixels, expected["pixel_values"])


def concurrent_users_answer_as_alone(engine, users: int = 6):
    """`users` threads chat two turns each, with their own image and question, at once; then each conversation again
    alone: the same answers, so no session saw another's image, text or cache."""
    images = [Image.new("RGB", (40, 30), (40 * user, 220 - 35 * user, 90)) for user in range(users)]

    def talk(user: int, session: str) -> list[str]:
        messages, replies = [user_turn(f"What is in picture {user}?")], []
        for turn in range(2):
            replies.append(list(engine.stream(messages, images[user], temperature=0.0, max_new_tokens=6, session_id=session))[-1])
            messages += [{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": f"And then {turn}?"}]
        return replies

    with ThreadPoolExecutor(users) as pool:
        together = list(pool.map(lambda user: talk(user, f"together-{user}"), range(users)))
    assert together == [talk(user, f"alone-{user}") for user in range(users)]


def test_concurrent_users_with_fewer_slots_than_users_answer_as_alone(saved_checkpoint):
    engine = ChatEngine(str(saved_checkpoint), device="cpu", static_slots=2)
    concurrent_users_answer_as_alone(engine)
    assert len(engine.slots) == 2


def test_one_off_answers_reuse_earlier_prefixes_within_a_bound(saved_checkpoint):
    """Without a session (an API client sending the whole conversation), a follow-up finds the first answer's cache
    by prefix and the image's features by hash; the prefix cache stays under its token bound however many come."""
    engine = ChatEngine(str(saved_checkpoint), device="cpu", prefix_cache_tokens=200)
    reference = ChatEngine(str(saved_checkpoint), device="cpu", prefix_cache_tokens=0)
    first = [user_turn("What is in the picture?")]
    follow_up = first + [{"role": "assistant", "content": answer(engine, first)}, {"role": "user", "content": "Why?"}]
    prefills, tower, hooks = record_calls(engine)
    try:
        assert answer(engine, follow_up) == answer(reference, follow_up)
    finally:
        for hook in hooks:
            hook.remove()
    full = engine.processor(images=IMAGE, text=engine.processor.apply_chat_template(follow_up, add_generation_prompt=True))
    assert prefills[0] < len(full["input_ids"][0]) // 2 and tower == []
    for user in range(6):
        image = Image.new("RGB", (40, 30), (40 * user, 100, 90))
        assert answer(engine, [user_turn(f"Question {user}?")], image=image) == answer(reference, [user_turn(f"Question {user}?")], image=image)
        assert engine.prefixes.cached_tokens <= 200
    assert len(engine.prefixes) >= 1


def test_a_conversation_with_two_images_answers_as_generate_and_reuses_its_cache(engine):
    """Several images in one conversation (a marker in each user turn that brought one): the answer equals
    transformers' generate on the processor's inputs for both images, and a follow-up prefills only its new tokens."""
    other = Image.new("RGB", (24, 52), (200, 40, 160))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A shape."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this one?"}]}]
    answer = list(engine.stream(messages, [IMAGE, other], temperature=0.0, max_new_tokens=8, session_id="two"))[-1]
    prompt = engine.processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = engine.processor(images=[IMAGE, other], text=prompt, return_tensors="pt")
    with torch.no_grad():
        ids = engine.model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert answer == engine.processor.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    follow_up = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "Are you sure?"}]
    progress = list(engine.generate(follow_up, [IMAGE, other], Sampling(0.0, 1.0, 4), session_id="two"))[-1]
    assert progress.cached_tokens >= inputs["input_ids"].shape[1]  # both images' spans came from the cache


def test_auto_dtype_runs_half_precision_checkpoints_in_float32_on_a_cpu_when_they_fit(saved_checkpoint, tmp_path, monkeypatch):
    import json

    from engine import chat
    from engine.chat import compute_dtype

    assert 0 < chat.available_memory() <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    half = tmp_path / "half"
    shutil.copytree(saved_checkpoint, half)
    config = json.loads((half / "config.json").read_text())
    for stored in ("float16", "bfloat16"):
        config["dtype"] = stored
        (half / "config.json").write_text(json.dumps(config))
        assert compute_dtype(str(half), "cpu") == torch.float32
    assert compute_dtype(str(half), "cuda") == "auto" and compute_dtype(str(half), "cpu", "bfloat16") == "bfloat16"
    assert compute_dtype(str(saved_checkpoint), "cpu") == "auto"  # float32 already
    weights = sum(path.stat().st_size for path in half.glob("*.safetensors"))
    monkeypatch.setattr(chat, "available_memory", lambda: 4 * weights - 1)  # float32 weights would take over half of it
    assert compute_dtype(str(half), "cpu") == "auto"



def test_a_row_whose_scores_are_not_numbers_gets_no_token_and_the_others_theirs():
    from engine.decoding import next_tokens

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[1, 7] = float("nan")
    logits[3, 2] = float("inf")
    samplings = [Sampling(0.0), Sampling(1.0, 0.9, seed=3), Sampling(1.0, 0.9, seed=3), Sampling(1.0)]
    generators = [sampling.generator("cpu") for sampling in samplings]
    tokens = next_tokens(logits, samplings, generators, suppress=[0])  # suppress's -inf is no reason to refuse a row
    assert tokens[1] is None and tokens[3] is None
    assert tokens[0] == int(logits[0, 1:].argmax()) + 1
    alone = next_tokens(logits[2:3], samplings[2:3], [samplings[2].generator("cpu")], suppress=[0])
    assert tokens[2] == alone[0] is not None  # drawn as it would be alone: the broken rows took nothing from it


def test_the_end_comes_with_the_last_tokens(engine):
    """An answer's finish reason travels with its last tokens, not in an empty message of its own: over the engine's
    process and to the client, that is one message and one write less per answer."""
    arrivals = list(engine.generate_tokens([user_turn("What is in the picture?")], IMAGE, Sampling(0.0, max_new_tokens=8),
                                           interval=0.5))
    assert arrivals[-1].finish_reason is not None and arrivals[-1].new
    assert all(arrived.new for arrived in arrivals) and all(arrived.finish_reason is None for arrived in arrivals[:-1])
