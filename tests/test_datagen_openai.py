"""The openai backend against a real chat-completions server on 127.0.0.1 that records requests and injects faults."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fake_openai import FakeOpenAI
from trainer.datagen import DatagenConfig, generate, load_annotations, symbolic_text
from trainer.datagen.run import run_batch

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def annotations_file(tmp_path):
    path = tmp_path / "ann.jsonl"
    path.write_text("\n".join(json.dumps({
        "id": f"img{n}", "image": f"img{n}.jpg", "width": 100, "height": 50,
        "captions": [f"street number {n} with parked cars"], "boxes": [{"label": "car", "bbox": [10, 5, 60, 45]}],
    }) for n in range(25)))
    return path


def config(annotations_file, server, tmp_path, **overrides):
    options = dict(inputs=[str(annotations_file)], output=str(tmp_path / "out.json"), backend="openai", model="gpt-4o",
                   base_url=server.base_url, api_key=KEY, concurrency=8, timeout=1.0, progress_bar=False)
    return DatagenConfig(**(options | overrides))


def chat_requests(server):
    return [request for request in server.requests if request["path"].endswith("/chat/completions")]


def test_prompt_holds_captions_and_boxes_and_the_key_only_in_the_header(annotations_file, tmp_path):
    with FakeOpenAI() as server:
        summary = generate(config(annotations_file, server, tmp_path, limit=2, kinds=("conversation",)))
    assert summary.accepted == 2
    first = load_annotations([annotations_file])[0]
    bodies = [json.loads(request["raw"]) for request in chat_requests(server)]
    assert symbolic_text(first) in [body["messages"][-1]["content"] for body in bodies]
    assert "car: [0.1, 0.1, 0.6, 0.9]" in symbolic_text(first)
    assert all(body["model"] == "gpt-4o" and body["messages"][0]["role"] == "system" for body in bodies)
    for request in chat_requests(server):
        assert request["headers"]["authorization"] == f"Bearer {KEY}"
        assert KEY.encode() not in request["raw"]
    for path in tmp_path.iterdir():
        assert KEY not in path.read_text(errors="ignore"), path


def test_with_20_percent_faults_every_input_yields_its_records_exactly_once(annotations_file, tmp_path):
    with FakeOpenAI(fault_rate=0.2, timeout_sleep=2.0, seed=1) as server:
        summary = generate(config(annotations_file, server, tmp_path, parse_retries=5))
    records = json.loads((tmp_path / "out.json").read_text())
    ids = [record["id"] for record in records]
    assert len(ids) == len(set(ids)) == 75 and summary.rejected == summary.failed == 0
    assert ids[:3] == ["img0_conversation", "img0_detail", "img0_complex"]
    assert summary.usage.retries > 0 and summary.parse_retries > 0
    # Every request the server saw was counted; a retry over a keep-alive connection the server had just closed may
    # be counted without reaching it.
    assert len(chat_requests(server)) <= summary.usage.requests <= len(chat_requests(server)) + 3
    by_id = {record["id"]: record for record in records}
    assert "street number 7 with parked cars" in by_id["img7_conversation"]["conversations"][1]["value"]
    assert summary.cost == pytest.approx((summary.usage.prompt_tokens * 2.5 + summary.usage.completion_tokens * 10) / 1e6)


def test_retry_after_is_honoured(annotations_file, tmp_path):
    with FakeOpenAI(script=["429"], retry_after="1.5") as server:
        generate(config(annotations_file, server, tmp_path, limit=1, kinds=("detail",), concurrency=1))
    first, second = chat_requests(server)[:2]
    assert second["time"] - first["time"] >= 1.4  # the client's own first backoff is at most 0.5 s


def test_unusable_answers_are_retried_then_rejected_and_not_redone(annotations_file, tmp_path):
    with FakeOpenAI(script=["malformed", "empty", "malformed"]) as server:
        summary = generate(config(annotations_file, server, tmp_path, limit=1, kinds=("complex",), concurrency=1))
    assert (summary.accepted, summary.rejected, summary.parse_retries) == (0, 1, 2)
    (reject,) = [json.loads(line) for line in (tmp_path / "out.json.rejects.jsonl").read_text().splitlines()]
    assert reject["id"] == "img0_complex" and "Question:" in reject["reason"] and reject["response"].startswith("I cannot")
    with FakeOpenAI() as server:
        again = generate(config(annotations_file, server, tmp_path, limit=1, kinds=("complex",)))
        assert (again.already_done, len(chat_requests(server))) == (1, 0)
        retried = generate(config(annotations_file, server, tmp_path, limit=1, kinds=("complex",), retry_rejects=True))
    assert retried.accepted == 1 and json.loads((tmp_path / "out.json").read_text())[0]["id"] == "img0_complex"


def test_a_bad_key_stops_the_run_with_a_clear_error(annotations_file, tmp_path):
    import openai

    with FakeOpenAI(fault_rate=1.0, faults=("401",)) as server:
        with pytest.raises(openai.AuthenticationError):
            generate(config(annotations_file, server, tmp_path))
    assert len(chat_requests(server)) <= 8  # one failed request per worker at most: the run stopped, jobs were not burnt


def test_killed_run_resumes_without_losing_or_duplicating(annotations_file, tmp_path):
    with FakeOpenAI(latency=0.05) as server:
        command = [sys.executable, "-m", "trainer.datagen.cli", "--input", str(annotations_file), "--output",
                   str(tmp_path / "out.json"), "--backend", "openai", "--base-url", server.base_url, "--concurrency", "2"]
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        progress = tmp_path / "out.json.progress.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not progress.exists() or len(progress.read_text().splitlines()) < 10):
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        done_before = len(progress.read_text().splitlines())
        assert 10 <= done_before < 75 and not (tmp_path / "out.json").exists()
        with open(progress, "a") as handle:
            handle.write('{"id": "img24_complex", "image": "img2')  # a line cut short by the kill
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "incomplete last line" in finished.stderr
    ids = [record["id"] for record in json.loads((tmp_path / "out.json").read_text())]
    assert len(ids) == len(set(ids)) == 75
    assert f"already done {done_before}" in finished.stdout


def test_batch_api_submits_then_collects(annotations_file, tmp_path):
    with FakeOpenAI() as server:
        cfg = config(annotations_file, server, tmp_path, limit=4)
        status, _ = asyncio.run(run_batch(cfg))
        assert status.startswith("submitted batch batch-0 with 12 requests")
        assert not (tmp_path / "out.json").exists()
        (batch_id, batch), = server.batches.items()
        assert batch["endpoint"] == "/v1/chat/completions"
        server.run_batch(batch_id, batch["input_file_id"])  # the service finishes the batch later
        status, summary = asyncio.run(run_batch(cfg))
    assert status == "collected the batch" and summary.accepted == 12
    assert summary.cost == pytest.approx((12 * 100 * 2.5 + 12 * 20 * 10) / 1e6 / 2)
    assert len(json.loads((tmp_path / "out.json").read_text())) == 12
    assert not chat_requests(server)  # nothing went through the live endpoint


def test_an_expired_batch_is_collected_as_far_as_it_went_then_resubmitted(annotations_file, tmp_path):
    with FakeOpenAI() as server:
        cfg = config(annotations_file, server, tmp_path, limit=2)
        asyncio.run(run_batch(cfg))
        (batch_id, batch), = server.batches.items()
        server.run_batch(batch_id, batch["input_file_id"])
        output = server.files[batch["output_file_id"]].decode().splitlines()
        server.files[batch["output_file_id"]] = "\n".join(output[:4]).encode()  # it expired after 4 of 6
        batch["status"] = "expired"
        status, summary = asyncio.run(run_batch(cfg))
        assert status.startswith("the batch ended expired") and summary.accepted == 4
        status, _ = asyncio.run(run_batch(cfg))
    assert status.startswith("submitted batch batch-1 with 2 requests")  # only what is still missing


def test_whitespace_captions_do_not_count(tmp_path):
    from trainer.datagen import AnnotationError

    path = tmp_path / "ann.jsonl"
    path.write_text(json.dumps({"id": "w", "image": "w.jpg", "width": 10, "height": 10, "captions": ["  ", "\n"]}))
    with pytest.raises(AnnotationError, match="no captions and no boxes"):
        load_annotations([path])
