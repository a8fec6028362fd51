import pytest
from PIL import Image

from engine import ChatEngine, ChatError
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


def test_a_failing_generation_is_raised_not_left_hanging(engine, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(engine.stream([user_turn("Hi")], IMAGE))
