"""RemoteChat, the app's front end for any OpenAI-compatible server, against llava-serve on loopback."""

from itertools import pairwise
from pathlib import Path

import pytest
from tiny_components import user_turn

from engine import ChatEngine, ChatError, NonFiniteScores
from engine.remote import RemoteChat
from engine.server import create_app, running

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "red_circle_blue_square.png"


@pytest.fixture(scope="module")
def engine():
    return ChatEngine(str(ROOT / "checkpoints" / "shapes-llava"), device="cpu")


def test_remote_chat_streams_what_the_local_engine_answers(engine, tmp_path):
    messages = [user_turn("What color is the circle?", image_first=False)]
    local = list(engine.stream(messages, str(IMAGE), temperature=0.0, max_new_tokens=30))
    with running(create_app(engine, "shapes-llava")) as base_url:
        remote = RemoteChat(base_url)  # no model named: the server's first
        chunks = list(remote.stream(messages, str(IMAGE), temperature=0.0, max_new_tokens=30, session_id="s1"))
        assert chunks[-1] == local[-1] and "red" in chunks[-1]
        assert all(later.startswith(earlier) for earlier, later in pairwise(chunks))
        follow_up = [*messages, {"role": "assistant", "content": chunks[-1]}, {"role": "user", "content": "Where is the square?"}]
        assert list(remote.stream(follow_up, str(IMAGE), temperature=0.0, max_new_tokens=30))[-1] == list(
            engine.stream(follow_up, str(IMAGE), temperature=0.0, max_new_tokens=30))[-1]
        bogus = tmp_path / "x.png"
        bogus.write_bytes(b"\x89PNG broken")
        with pytest.raises(ChatError, match="x.png"):  # refused here, as the local engine would
            list(remote.stream(messages, str(bogus)))
        with pytest.raises(ChatError, match="temperature"):  # refused by the server: a ChatError the app shows
            list(remote.stream(messages, str(IMAGE), temperature=5.0))


def test_an_answer_the_served_model_breaks_off_keeps_its_text_and_says_why(engine, monkeypatch):
    """The server's error event for NaN scores mid-stream becomes the engine's own NonFiniteScores, which the app
    shows after the text so far (a generic error would lose both)."""
    batch, real_step = engine.scheduler._batch, engine.scheduler._batch.step

    def step():  # every answer's scores turn NaN from its fourth token on
        logits = real_step()
        for index, row in enumerate(batch.rows):
            if len(row.tokens) >= 3:
                logits[index] = float("nan")
        return logits

    monkeypatch.setattr(batch, "step", step)
    messages = [user_turn("Describe the image in detail.", image_first=False)]
    with running(create_app(engine, "shapes-llava", stream_interval=0.0)) as base_url:
        remote, chunks = RemoteChat(base_url), []
        with pytest.raises(NonFiniteScores, match="NaN or infinite"):
            for chunk in remote.stream(messages, str(IMAGE), temperature=0.0, max_new_tokens=30):
                chunks.append(chunk)
    assert chunks and chunks[-1].strip()  # the text before the scores broke
