"""The app as a hostile visitor of a public Space meets it: the operator's key, the Data tab as a proxy, what the
browser keeps, decompression bombs and huge questions. A real app on loopback, a capture server for the requests it
sends out, gradio_client as the visitor."""

import io
import threading
import time

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app_process import peak_memory_mb, running_app
from fake_openai import FakeOpenAI

OPERATOR_KEY, OPERATOR_ORG = "sk-operator-secret-123", "org-operator-456"
BOXES = "blue square: [10, 10, 50, 50]"


@pytest.fixture(scope="module")
def allowed():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def elsewhere():
    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture(scope="module")
def app(saved_checkpoint, allowed, tmp_path_factory):
    """An operator who turned remote drafting on for one server, with their own key in the environment."""
    import os

    env = {**os.environ, "OPENAI_API_KEY": OPERATOR_KEY, "OPENAI_ORG_ID": OPERATOR_ORG}
    args = ["--model", str(saved_checkpoint), "--remote-drafting", "--draft-base-url", allowed.base_url, "--draft-timeout", "5"]
    with running_app(args, tmp_path_factory.mktemp("secure") / "app.log", env=env) as (url, process):
        yield url, process


def draft(url, backend="openai", key="", base_url="", image=None):
    return Client(url, verbose=False).predict("", "Two shapes.", BOXES, image, 100, 100, ["detail"], backend, key, base_url,
                                              "gpt-4.1", 0, api_name="/draft")


def sent_secrets(fake) -> str:
    return " ".join(str(request["headers"]) for request in fake.requests)


def test_a_visitor_without_a_key_never_drafts_on_the_operators_key(app, allowed):
    before = len(allowed.requests)
    with pytest.raises(AppError, match="type your API key"):
        draft(app[0], key="", base_url=allowed.base_url)
    assert len(allowed.requests) == before and OPERATOR_KEY not in sent_secrets(allowed)


def test_the_visitors_key_goes_to_their_request_and_nothing_of_the_operators_with_it(app, allowed):
    draft(app[0], key="sk-visitor-789", base_url=allowed.base_url)
    request = allowed.requests[-1]
    assert request["headers"]["authorization"] == "Bearer sk-visitor-789"
    assert "openai-organization" not in request["headers"] and OPERATOR_KEY not in sent_secrets(allowed)


def test_only_the_servers_the_operator_allowed_are_reached(app, elsewhere):
    for url in (elsewhere.base_url, "http://169.254.169.254/latest/meta-data", "http://127.0.0.1:1/v1?x=1"):
        with pytest.raises(AppError, match="drafts only through"):
            draft(app[0], key="sk-visitor", base_url=url)
    assert elsewhere.requests == []


def test_the_remote_servers_error_body_is_not_shown(app, allowed):
    allowed.script = ["401"]  # its body says "Incorrect API key provided"
    with pytest.raises(AppError) as error:
        draft(app[0], key="sk-wrong", base_url=allowed.base_url)
    assert "401" in str(error.value) and "Incorrect API key" not in str(error.value)


def test_the_remote_backend_is_off_unless_the_operator_turns_it_on(allowed, tmp_path):
    import gradio

    from app import DraftPolicy, make_draft

    before = len(allowed.requests)
    with pytest.raises(gradio.Error, match="remote backend is off"):
        make_draft(DraftPolicy())("", "Two shapes.", BOXES, None, 100, 100, ["detail"], "openai", "sk-visitor",
                                  allowed.base_url, "gpt-4.1", 0)
    assert len(allowed.requests) == before


def test_a_slow_drafting_server_does_not_hold_up_other_visitors(app, allowed):
    allowed.latency = 3.0
    slow = threading.Thread(target=draft, args=(app[0],), kwargs={"key": "sk-visitor", "base_url": allowed.base_url})
    try:
        slow.start()
        time.sleep(0.5)  # the slow request is waiting on the server
        started = time.monotonic()
        text = draft(app[0], backend="offline")[2]
        took = time.monotonic() - started
        assert '"id": "pasted_detail"' in text and took < 2.5 and slow.is_alive(), took
    finally:
        slow.join(timeout=30)
        allowed.latency = 0.0


def test_nothing_a_visitor_typed_is_kept_in_the_run_history(app):
    import httpx

    config = httpx.get(app[0] + "config", timeout=10).json()
    assert config.get("run_history") is False
    assert httpx.get(app[0] + "gradio_api/runs", timeout=10).status_code != 200


def bomb(tmp_path, side=13000):
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # about 20 KB on disk, 169 megapixels
    return path


def test_a_decompression_bomb_is_refused_from_its_header(app, tmp_path):
    url, process = app
    path = bomb(tmp_path)
    assert path.stat().st_size < 100_000
    before = peak_memory_mb(process.pid)
    answer = Client(url, verbose=False).predict({"text": "What is it?", "files": [handle_file(str(path))]}, 0.0, 0.7, 4,
                                                api_name="/chat")
    assert answer.startswith("Sorry") and "13000x13000" in answer and "limit is 40 megapixels" in answer
    with pytest.raises(AppError, match="limit is 40 megapixels"):
        draft(url, backend="offline", image=handle_file(str(path)))
    assert peak_memory_mb(process.pid) - before < 200  # decoding it would take 169 MB as bits, 507 MB as RGB


def test_a_huge_question_is_refused_before_it_is_tokenized(app, tmp_path):
    url, _ = app
    picture = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(picture)
    client = Client(url, verbose=False)
    started = time.monotonic()
    answer = client.predict({"text": "why " * 250_000, "files": [handle_file(str(picture))]}, 0.0, 0.7, 4, api_name="/chat")
    assert answer.startswith("Sorry") and "1,000,000 characters long; the limit is 4,000" in answer
    assert time.monotonic() - started < 10
    follow = client.predict({"text": "What is it?", "files": []}, 0.0, 0.7, 4, api_name="/chat")
    assert not follow.startswith(("Sorry", "Please")), follow  # the refused question is not in the next prompt


def test_an_image_past_pils_own_bomb_limit_gets_our_message(tmp_path):
    from engine.untrusted import UntrustedInputError, open_image

    with pytest.raises(UntrustedInputError, match="limit of 40 megapixels"):
        open_image(bomb(tmp_path, side=20000))  # 400 megapixels: PIL itself refuses to open it


def test_the_data_tabs_text_fields_are_capped_before_parsing():
    import gradio

    from app import MAX_DRAFT_FIELD_CHARS, DraftPolicy, make_draft

    boxes = "square: [1, 1, 2, 2]\n" * (MAX_DRAFT_FIELD_CHARS // 10)
    with pytest.raises(gradio.Error, match="the boxes field is .* characters long; the limit is 100,000"):
        make_draft(DraftPolicy())("", "A square.", boxes, None, 100, 100, ["detail"], "offline", "", "", "gpt-4.1", 0)


def test_uploads_of_other_formats_are_refused(tmp_path):
    from engine.untrusted import UntrustedInputError, open_image

    eps = tmp_path / "page.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(UntrustedInputError, match="not an image in one of PNG, JPEG"):
        open_image(eps)
    jpeg = io.BytesIO()
    Image.new("RGB", (4000, 3000), (9, 9, 9)).save(jpeg, "JPEG")
    assert max(open_image(jpeg.getvalue(), max_side=1024).size) <= 1024  # decoded reduced
