"""llava-serve and clients that go away: a client that stops waiting for a whole (non-streamed) answer must not
leave the engine computing it to max_tokens, nor hold its place (the openai client retries a timed-out request
twice by default, which without this computed the same long answer three times)."""

import threading
import time

import httpx

from engine.chat import Progress
from engine.engine_process import EngineStopped
from engine.server import create_app, running
from test_serve import CIRCLES, MODEL


class Endless:
    """An engine whose answers grow a word per 50 ms for 20 s; `closed` once the server let go of one."""

    def __init__(self):
        self.closed, self.steps = threading.Event(), 0

    def generate(self, messages, image, sampling, stop=(), interval=0.0, cancel=None, prompting=None):
        try:
            yield from self._words()
        finally:
            self.closed.set()

    def _words(self):
        for step in range(1, 401):
            self.steps = step
            yield Progress("word " * step, prompt_tokens=3, cached_tokens=0, completion_tokens=step)
            time.sleep(0.05)
        yield Progress("the end", prompt_tokens=3, cached_tokens=0, completion_tokens=401, finish_reason="length")


def test_a_client_that_stops_waiting_for_a_whole_answer_cancels_it():
    body, endless = {"model": MODEL, "messages": CIRCLES, "max_tokens": 4000}, Endless()
    with running(create_app(endless, MODEL, max_concurrent=1)) as base_url:
        try:
            httpx.post(base_url + "/chat/completions", json=body, timeout=0.5)
        except httpx.TimeoutException:
            pass  # the client gave up; the server notices and lets go of the answer
        assert endless.closed.wait(3), f"the answer went on without its client ({endless.steps} steps)"
        steps = endless.steps
        time.sleep(0.3)
        assert endless.steps == steps  # and nothing computes it any more
        # its place is free: a request that streams gets an answer rather than 503
        with httpx.stream("POST", base_url + "/chat/completions", json={**body, "stream": True}, timeout=10) as response:
            assert response.status_code == 200 and next(response.iter_lines()).startswith("data: ")


class DiesMidAnswer:
    def generate(self, messages, image, sampling, stop=(), interval=0.0, cancel=None, prompting=None):
        yield Progress("a", prompt_tokens=3, cached_tokens=0, completion_tokens=1)
        raise EngineStopped("the engine's process stopped (exit code -9)")


def test_an_engine_that_dies_mid_answer_is_still_a_503_for_a_whole_answer():
    with running(create_app(DiesMidAnswer(), MODEL)) as base_url:
        response = httpx.post(base_url + "/chat/completions", json={"model": MODEL, "messages": CIRCLES}, timeout=10)
    assert response.status_code == 503 and response.json()["error"]["code"] == "engine_stopped"
