"""The app end to end: a real server on loopback, driven through gradio_client as a user's script would."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app import conversation_from

APP = Path(__file__).resolve().parent.parent / "app.py"


def test_conversation_keeps_the_image_in_the_first_user_turn():
    history = [
        {"role": "user", "content": [{"path": "/tmp/cat.png"}]},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A cat."},
    ]
    messages, image = conversation_from({"text": "What colour?", "files": []}, history)
    assert image == "/tmp/cat.png"
    assert messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour?"},
    ]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(saved_checkpoint, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("app") / "app.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(APP), "--model", str(saved_checkpoint), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"app exited with {process.returncode}: {Path(log.name).read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("app did not start within 120 s")
    yield url
    process.terminate()
    process.wait(timeout=30)


def test_chat_answers_a_question_about_an_image(server, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (255, 0, 0)).save(image)
    client = Client(server, verbose=False)
    first = client.predict({"text": "What is in the picture?", "files": [handle_file(str(image))]}, 0.0, 0.7, 8, api_name="/chat")
    assert isinstance(first, str) and first and not first.startswith(("Please", "Sorry"))


def direct_answer(saved_checkpoint, turns, image):
    """What the engine answers for the whole conversation at once, without any cache (greedy)."""
    from engine import ChatEngine

    engine = direct_answer.engine = getattr(direct_answer, "engine", None) or ChatEngine(str(saved_checkpoint), device="cpu")
    return list(engine.stream(turns, image, temperature=0.0, max_new_tokens=8))[-1]


def test_two_turns_through_the_api_continue_one_conversation(server, saved_checkpoint, tmp_path):
    picture = tmp_path / "blue.png"
    Image.new("RGB", (64, 48), (0, 0, 255)).save(picture)
    client = Client(server, verbose=False)
    first = client.predict({"text": "What is it?", "files": [handle_file(str(picture))]}, 0.0, 0.7, 8, api_name="/chat")
    second = client.predict({"text": "Are you sure?", "files": []}, 0.0, 0.7, 8, api_name="/chat")
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": first}, {"role": "user", "content": "Are you sure?"}]
    image = Image.open(picture).convert("RGB")
    assert first == direct_answer(saved_checkpoint, turns[:1], image)
    assert second == direct_answer(saved_checkpoint, turns, image)  # the second turn saw the first
    other = Client(server, verbose=False).predict({"text": "Are you sure?", "files": []}, 0.0, 0.7, 8, api_name="/chat")
    assert other == "Please attach an image to your first message."  # another client has no conversation yet


def test_eight_concurrent_clients_get_their_own_answers(server, saved_checkpoint, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    pictures = []
    for index in range(8):
        path = tmp_path / f"{index}.png"
        colour = ((index * 97) % 256, (index * 53 + 128) % 256, (255 - index * 31) % 256)
        Image.new("RGB", (40 + index * 9, 40), colour).save(path)
        pictures.append(path)

    def ask(path):
        return Client(server, verbose=False).predict({"text": "Describe it.", "files": [handle_file(str(path))]}, 0.0, 0.7, 8, api_name="/chat")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, pictures))
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    assert answers == [direct_answer(saved_checkpoint, turn, Image.open(path).convert("RGB")) for path in pictures]
    assert len(set(answers)) > 1, answers  # different images, different answers: a mix-up would show


def test_first_message_without_an_image_is_asked_for_one(server):
    answer = Client(server, verbose=False).predict({"text": "Hello?", "files": []}, 0.0, 0.7, 8, api_name="/chat")
    assert answer == "Please attach an image to your first message."


def test_a_file_that_is_not_an_image_gets_a_clear_message(server, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("just text")
    answer = Client(server, verbose=False).predict(
        {"text": "What is this?", "files": [handle_file(str(bogus))]}, 0.0, 0.7, 8, api_name="/chat"
    )
    assert answer.startswith("Sorry, I could not use that input: cannot read image") and "notes.png" in answer


def test_data_tab_drafts_shows_boxes_and_offers_a_download():
    import json as json_module

    from app import draft

    picture = Image.new("RGB", (336, 336), "white")
    boxed, chat, text, path = draft("", "A red circle.", "red circle: [20, 20, 120, 120]", picture, None, None,
                                    ["conversation", "detail"], "offline", "", "", "gpt-4.1", 0)
    assert boxed.getpixel((20, 70)) == (255, 0, 255) and picture.getpixel((20, 70)) == (255, 255, 255)
    records = json_module.loads(open(path).read())
    assert [record["id"] for record in records] == ["pasted_conversation", "pasted_detail"]
    assert json_module.loads(text) == records and chat[0]["content"] == "**pasted_conversation**"


def test_data_tab_reports_bad_boxes_clearly():
    import gradio

    from app import draft

    with pytest.raises(gradio.Error, match="box line 1 should read"):
        draft("", "A cat.", "cat: [1, 2]", None, 100, 100, ["detail"], "offline", "", "", "gpt-4.1", 0)


def test_data_tab_through_the_api(server):
    boxed, chat, text, path = Client(server, verbose=False).predict(
        "", "Two shapes.", "blue square: [10, 10, 50, 50]", None, 100, 100, ["complex"], "offline", "", "", "gpt-4.1", 3,
        api_name="/draft")
    assert '"id": "pasted_complex"' in text and path.endswith("instruct.json")


@pytest.mark.timeout(300)
def test_without_arguments_the_app_answers_its_examples_with_the_embedded_model(tmp_path):
    """The quickstart path: `python app.py`, no --model, answers each example question with the embedded model, in
    the form its question asks for. (Whether the answers are right is the shapes model's own test,
    tests/test_shapes_model.py; its scores are in docs/shapes/report.md.)"""
    from app import EXAMPLES
    from trainer.shapes.world import COLORS, GRID, SHAPES, judge

    kinds = {"What color is the circle?": ("color", COLORS), "How many shapes are in the image?": ("count", [1, 2, 3]),
             "Where is the yellow triangle?": ("position", GRID),
             "Describe the image.": ("describe", [[f"{c} {s}"] for c in COLORS for s in SHAPES]),
             "Is there a blue square in the image?": ("yes/no", ["yes", "no"])}
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "LLAVA_MODEL"}
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen([sys.executable, str(APP), "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client, deadline = None, time.monotonic() + 120
        while client is None:
            assert process.poll() is None and time.monotonic() < deadline, Path(log.name).read_text()[-2000:]
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet
                time.sleep(0.5)
        for example in EXAMPLES:
            answer = client.predict({"text": example["text"], "files": [handle_file(example["files"][0])]}, 0.0, 0.7, 64,
                                    api_name="/chat")
            kind, values = kinds[example["text"]]
            assert any(judge(kind, answer, value) for value in values), (example["text"], answer)
    finally:
        process.terminate()
        process.wait(timeout=30)
