"""The app end to end: a real server on loopback, driven through gradio_client as a user's script would."""

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
