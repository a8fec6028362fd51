"""llava-serve against hostile and unusual input: image URLs that point inside the server's network, parameters it
does not implement, several images, long stop strings. On loopback, through the official openai client where a
client is involved."""

import base64
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from engine.decoding import Sampling
from engine.media import MediaError, MediaPolicy, image_bytes
from engine.server import create_app, running
from engine.url_fetch import parse_networks
from test_serve import CIRCLES, EXAMPLES, MODEL, ask, client, data_url, engine, question, refused, streamed  # noqa: F401

PNG = (EXAMPLES / "red_circle_blue_square.png").read_bytes()
LOOPBACK_ONLY = (ipaddress.ip_network("127.0.0.1/32"),)  # 127.0.0.2 is loopback too, and not allowed by this


@contextmanager
def image_server(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None):
    """A loopback web server (https with `tls`): /shapes.png is an image, /to?URL redirects to URL, /gzip is a
    gzip-encoded body. Yields its base URL and the (path, Host header) of every request it got."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers["host"]))
            if self.path.startswith("/to?"):
                self.send_response(302)
                self.send_header("Location", self.path.removeprefix("/to?"))
                self.end_headers()
                return
            self.send_response(200 if self.path in ("/shapes.png", "/gzip") else 404)
            self.send_header("Content-Type", "image/png")
            if self.path == "/gzip":
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if tls else 'http'}://{host}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def resolver(answers: dict[str, list[str]], calls: list | None = None):
    """A DNS stand-in: `answers` per host name; IP literals resolve to themselves."""
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append(host)
        return answers[host] if host in answers else [str(ipaddress.ip_address(host))]
    return resolve


def fetch_refused(url: str, policy: MediaPolicy) -> str:
    with pytest.raises(MediaError) as caught:
        image_bytes(url, policy)
    return str(caught.value)


def test_image_urls_never_reach_private_addresses(engine):
    with image_server() as (base, seen), running(create_app(engine, MODEL, MediaPolicy(allow_urls=True))) as base_url:
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
        error = refused(lambda: ask(api, question("What color is the circle?", base + "/shapes.png")))
        assert error.status_code == 400 and error.body["code"] == "invalid_image"
        assert "127.0.0.1 is not a public address" in error.body["message"]
        assert ask(api, CIRCLES).choices[0].message.content  # the server goes on
    assert seen == []  # refused before connecting
    policy = MediaPolicy(allow_urls=True)
    for url in ["http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png", "http://[::ffff:127.0.0.1]/x.png",
                "http://0.0.0.0/x.png", "http://10.1.2.3/x.png", "http://192.168.0.1/x.png", "http://100.64.0.1/x.png",
                "http://224.0.0.1/x.png", "http://[fe80::1]/x.png", "http://[fd00::1]/x.png", "http://[ff02::1]/x.png",
                "http://240.0.0.1/x.png", "http://2130706433/x.png", "http://[2002:7f00:1::]/x.png", "https://[::]/x.png",
                "http://[fec0::1]/x.png"]:
        assert "is not a public address" in fetch_refused(url, policy), url


def test_a_public_looking_name_that_resolves_to_a_private_address_is_refused():
    with image_server() as (base, seen):
        port = base.rsplit(":", 1)[1]
        for answers in (["127.0.0.1"], ["93.184.215.14", "127.0.0.1"], ["::ffff:169.254.169.254"]):
            policy = MediaPolicy(allow_urls=True, resolve=resolver({"images.example.com": answers}))
            message = fetch_refused(f"http://images.example.com:{port}/shapes.png", policy)
            assert "images.example.com is not a public address" in message and "127.0.0.1" not in message, answers
    assert seen == []


def test_redirects_are_checked_hop_by_hop(engine):
    """The first hop is allowed (the operator's network: 127.0.0.1 alone); where it redirects is checked anew."""
    policy = MediaPolicy(allow_urls=True, private_networks=LOOPBACK_ONLY)
    with image_server() as (base, seen), image_server("127.0.0.2") as (elsewhere, elsewhere_seen):
        assert image_bytes(f"{base}/to?/shapes.png", policy) == PNG  # a redirect within what is allowed is followed
        assert [path for path, _ in seen] == ["/to?/shapes.png", "/shapes.png"]
        for target, why in [(f"{elsewhere}/shapes.png", "127.0.0.2 is not a public address"),
                            ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is not a public address"),
                            ("file:///etc/passwd", "only http and https"),
                            (f"{base}/to?{base}/to?{base}/to?{base}/shapes.png", "redirects more than 3 times")]:
            assert why in fetch_refused(f"{base}/to?{target}", policy), target
        assert elsewhere_seen == []
        assert "gzip-encoded" in fetch_refused(f"{base}/gzip", policy)
        with pytest.raises(MediaError) as caught:
            image_bytes(f"{base}/shapes.png", MediaPolicy(allow_urls=True, private_networks=LOOPBACK_ONLY, max_bytes=100))
        assert caught.value.status == 413


def test_the_connection_goes_to_the_address_that_was_checked():
    """DNS rebinding: a name that answers an allowed address to the check and another one later. The fetch resolves
    once and connects to what it checked, under the URL's own name (Host header)."""
    calls = []
    answers = iter([["127.0.0.1"]] + [["127.0.0.2"]] * 5)
    policy = MediaPolicy(allow_urls=True, private_networks=LOOPBACK_ONLY,
                         resolve=lambda host, port: (calls.append(host), next(answers))[1])
    with image_server() as (base, seen), image_server("127.0.0.2") as (_, elsewhere_seen):
        port = base.rsplit(":", 1)[1]
        assert image_bytes(f"http://rebind.example:{port}/shapes.png", policy) == PNG
    assert calls == ["rebind.example"] and seen == [("/shapes.png", f"rebind.example:{port}")] and elsewhere_seen == []


@contextmanager
def dripping_server(start: bytes, drip: bytes, pause: float = 0.2):
    """A loopback server that answers every request with `start` at once, then `drip` a byte per `pause` seconds
    (each byte well within any read timeout). Yields its base URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer(connection):
        with connection:
            connection.recv(65536)
            try:
                connection.sendall(start)
                for byte in drip:
                    time.sleep(pause)
                    connection.sendall(bytes([byte]))
            except OSError:  # the fetch gave up and shut the connection
                pass

    def serve():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # closed at the end of the test
                return
            threading.Thread(target=answer, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_a_server_that_drips_its_answer_is_cut_off_at_the_fetch_timeout():
    """httpx's timeout is per read: headers or a body a byte at a time, each within it, took 24 x 0.2 s here (and
    hours with a patient server) while the request held its place. The whole fetch must end at its timeout."""
    policy = MediaPolicy(allow_urls=True, private_networks=LOOPBACK_ONLY, fetch_timeout=1.0)
    for start, drip in [(b"HTTP/1.1 200 OK\r\n", b"X-Slow: " + b"a" * 24),  # headers that never end
                        (b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n", PNG[:32])]:  # nor does the body
        with dripping_server(start, drip) as base:
            began = time.monotonic()
            message = fetch_refused(f"{base}/shapes.png", policy)
            assert "took more than 1 s" in message and time.monotonic() - began < 2.5, (start, message)


def test_a_name_server_that_never_answers_is_cut_off_at_the_fetch_timeout():
    """getaddrinfo has no timeout: a host whose name server does not answer held the request for the system
    resolver's own time. The lookup is given what is left of the fetch's time; the stuck lookups hold none of the
    requests behind them, which are answered as usual."""
    answer = threading.Event()

    def resolve(host: str, port: int) -> list[str]:
        if host == "slow.example":
            answer.wait(30)  # a name server that never answers (until the test lets it go)
        return ["127.0.0.1"]

    policy = MediaPolicy(allow_urls=True, private_networks=LOOPBACK_ONLY, fetch_timeout=0.5, resolve=resolve)
    try:
        with image_server() as (base, seen):
            port = base.rsplit(":", 1)[1]
            for _ in range(10):  # more than there are resolver threads: each waits only for its own lookup
                began = time.monotonic()
                message = fetch_refused(f"http://slow.example:{port}/shapes.png", policy)
                assert "resolving the image URL's host slow.example took more than the fetch's 0.5 s" in message
                assert time.monotonic() - began < 1.5
            answer.set()
            assert image_bytes(f"http://fast.example:{port}/shapes.png", policy) == PNG
            assert seen == [("/shapes.png", f"fast.example:{port}")]
    finally:
        answer.set()


def test_local_file_urls_say_nothing_of_paths_outside_the_folder(tmp_path):
    """A missing file and one outside the folder get the same answer (else a client maps the server's files); a
    NUL byte, a host, a fifo and a device are refused as such, and nothing blocks."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    (allowed / "shapes.png").write_bytes(PNG)
    (outside / "secret.png").write_bytes(PNG)
    os.mkfifo(allowed / "fifo.png")
    (allowed / "zero.png").symlink_to("/dev/zero")
    policy = MediaPolicy(allowed_local_path=allowed)
    assert image_bytes((allowed / "shapes.png").as_uri(), policy) == PNG
    assert image_bytes(f"file://localhost{allowed}/shapes.png", policy) == PNG
    answers = {url: fetch_refused(url, policy).removeprefix(url) for url in [
        (outside / "secret.png").as_uri(), (outside / "missing.png").as_uri(), (allowed / "missing.png").as_uri(),
        f"file://{allowed}/../outside/secret.png", f"file://{allowed}/shapes.png%00.txt", (allowed / "fifo.png").as_uri(),
        (allowed / "zero.png").as_uri(), allowed.as_uri()]}
    assert set(answers.values()) == {" is not an image file inside the folder this server allows"}, answers
    assert "names the host images.example" in fetch_refused(f"file://images.example{allowed}/shapes.png", policy)
    with pytest.raises(MediaError) as caught:
        image_bytes((allowed / "shapes.png").as_uri(), MediaPolicy(allowed_local_path=allowed, max_bytes=100))
    assert caught.value.status == 413


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_checks_the_certificate_against_the_urls_name_while_connecting_to_the_checked_address(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=images.internal",
                    "-addext", "subjectAltName=DNS:images.internal"], check=True, capture_output=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    policy = MediaPolicy(allow_urls=True, private_networks=LOOPBACK_ONLY, verify=ssl.create_default_context(cafile=cert),
                         resolve=resolver({"images.internal": ["127.0.0.1"], "other.internal": ["127.0.0.1"]}))
    with image_server(tls=tls) as (base, seen):
        port = base.rsplit(":", 1)[1]
        assert image_bytes(f"https://images.internal:{port}/shapes.png", policy) == PNG
        for wrong in (f"https://other.internal:{port}/shapes.png", f"{base}/shapes.png"):  # not the certificate's name
            assert "could not fetch" in fetch_refused(wrong, policy), wrong
    assert seen == [("/shapes.png", f"images.internal:{port}")]


def test_with_private_addresses_allowed_a_loopback_image_server_answers(engine):
    policy = MediaPolicy(allow_urls=True, private_networks=parse_networks([]),
                         resolve=resolver({"images.internal": ["127.0.0.1"]}))
    with image_server() as (base, seen), running(create_app(engine, MODEL, policy)) as base_url:
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
        url = base.replace("127.0.0.1", "images.internal") + "/shapes.png"
        answer = ask(api, question("What color is the circle?", url)).choices[0].message.content
    assert answer == ask_alone(engine, "What color is the circle?", [PNG]) and "red" in answer
    assert seen and seen[0][1].startswith("images.internal:")


def ask_alone(engine, text: str, images: list[bytes], **options) -> str:
    """What the engine answers itself, greedily, as the server's requests ask (max_tokens 40)."""
    parts = [{"type": "text", "text": text}, *[{"type": "image"}] * len(images)]
    progress = list(engine.generate([{"role": "user", "content": parts}], images, Sampling(0.0, 1.0, 40), **options))
    return progress[-1].text


UNSUPPORTED = {"modalities": ["text", "audio"],
               "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"}}


def test_parameters_the_server_does_not_implement_are_refused_by_name(client):
    for name, value in UNSUPPORTED.items():
        error = refused(lambda: ask(client, CIRCLES, **{name: value}))
        assert error.status_code == 400 and error.body["param"] == name and error.body["code"] == "unsupported_parameter"
        assert error.body["message"].startswith(f"{name}: not supported"), error.body
    for extra in ({"functions": [{"name": "f"}]}, {"function_call": "auto"}, {"structural_tag": {"type": "structural_tag"}}):
        assert refused(lambda: ask(client, CIRCLES, extra_body=extra)).body["param"] == next(iter(extra))
    assert "send tools and tool_choice" in refused(lambda: ask(client, CIRCLES, extra_body={"functions": [{"name": "f"}]})).message
    error = refused(lambda: ask(client, CIRCLES, stream_options={"include_usage": True}))  # without stream
    assert error.status_code == 400 and error.body["param"] == "stream_options"
    error = refused(lambda: ask(client, CIRCLES, stop=["x" * 1001]))
    assert error.status_code == 400 and error.body["param"] == "stop"


def test_harmless_parameters_are_accepted(client):
    plain = ask(client, CIRCLES).choices[0].message.content
    harmless = {"n": 1, "user": "u-1", "metadata": {"app": "test"}, "store": False, "frequency_penalty": 0,
                "presence_penalty": 0.0, "parallel_tool_calls": False, "response_format": {"type": "text"},
                "tool_choice": "none", "logprobs": False, "service_tier": "auto", "modalities": ["text"]}
    assert ask(client, CIRCLES, **harmless).choices[0].message.content == plain
    assert ask(client, CIRCLES, extra_body={"top_k": -1, "repetition_penalty": 1.0}).choices[0].message.content == plain
    assert ask(client, CIRCLES, extra_body={"stream": None, "stream_options": None}).choices[0].message.content == plain


def test_vanishing_temperatures_and_top_ps_answer_greedily_and_fail_no_one_else(client):
    """temperature 1e-300 became 0 in float32 and NaN in the softmax: a 500, and the multinomial's error failed every
    answer in the scheduler's batch with it. Now such values decode greedily, as they all but ask."""
    greedy = ask(client, CIRCLES).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(streamed, client, CIRCLES) for _ in range(3)]
        for tiny in ({"temperature": 1e-300}, {"temperature": 1e-45, "seed": 1}, {"temperature": 1, "top_p": 1e-300}):
            assert ask(client, CIRCLES, **tiny).choices[0].message.content == greedy, tiny
        assert [other.result()[0] for other in others] == [greedy] * 3


def test_several_images_answer_as_the_engine_does_with_all_of_them(client, engine):
    """Two images in one request, in the order they come: the engine's own answer to both, not to the first alone."""
    text, second = "What color is the circle?", (EXAMPLES / "three_shapes.png").read_bytes()
    red, yellow = (CIRCLES[0]["content"][1], {"type": "image_url", "image_url": {"url": data_url(EXAMPLES / "three_shapes.png")}})
    both = ask(client, [{"role": "user", "content": [{"type": "text", "text": text}, red, yellow]}]).choices[0].message.content
    assert both == ask_alone(engine, text, [PNG, second])
    assert both != ask(client, CIRCLES).choices[0].message.content == ask_alone(engine, text, [PNG])
    swapped = ask(client, [{"role": "user", "content": [{"type": "text", "text": text}, yellow, red]}]).choices[0].message.content
    assert swapped == ask_alone(engine, text, [second, PNG])
    five = [{"role": "user", "content": [{"type": "text", "text": text}, *[red] * 5]}]
    error = refused(lambda: ask(client, five))
    assert error.status_code == 400 and error.body["code"] == "too_many_images" and "5 images" in error.body["message"]


def test_a_long_stop_string_holds_back_only_what_could_start_it(engine):
    with running(create_app(engine, MODEL, stream_interval=0)) as base_url:
        api = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=30)
        never = ["x" * 200]
        whole = ask(api, CIRCLES, stop=never).choices[0].message.content
        chunks = [chunk.choices[0].delta.content for chunk in api.chat.completions.create(
            model=MODEL, messages=CIRCLES, temperature=0, max_tokens=40, stream=True, stop=never)
            if chunk.choices and chunk.choices[0].delta.content]
        assert len(chunks) > 1 and "".join(chunks) == whole  # the text came as it grew, not all at the end
        stop = whole[4:14]  # a stop string that does come, ten characters into the answer
        expected = whole[: whole.index(stop)].rstrip()
        cut = ask(api, CIRCLES, stop=[stop, "y" * 300])
        assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
        assert streamed(api, CIRCLES, stop=[stop, "y" * 300])[0] == expected


def test_base64_as_clients_encode_it_is_read_and_garbage_is_not():
    policy, encoded = MediaPolicy(), base64.b64encode(PNG).decode()
    wrapped = "\n".join(encoded[at: at + 76] for at in range(0, len(encoded), 76))  # MIME, the `base64` tool
    for variant in (encoded, wrapped, wrapped.replace("\n", "\r\n"), encoded.rstrip("="),
                    base64.urlsafe_b64encode(PNG).decode()):
        assert image_bytes("data:image/png;base64," + variant, policy) == PNG
    for garbage in ("not base64!", encoded[:-1] + "*", "QUJD" * 10 + "Q"):  # outside the alphabet; a dangling character
        with pytest.raises(MediaError, match="base64 is malformed"):
            image_bytes("data:image/png;base64," + garbage, policy)


def test_a_system_message_in_text_parts_is_joined_a_line_each_as_a_users_is():
    from engine.openai_api import engine_messages, parse_request

    body = {"model": MODEL, "messages": [
        {"role": "system", "content": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Answer in one word."}]},
        {"role": "user", "content": "Hi"}]}
    messages, images = engine_messages(parse_request(json.dumps(body).encode()), MediaPolicy())
    assert messages[0] == {"role": "system", "content": "You are terse.\nAnswer in one word."} and images == []


def test_messages_of_one_role_in_a_row_are_one_turn_and_are_answered(client):
    """OpenAI takes them (LangChain sends two HumanMessages so); LLaVA's prompt alternates user and assistant."""
    from engine.openai_api import engine_messages, parse_request

    image = {"type": "image_url", "image_url": {"url": CIRCLES[0]["content"][1]["image_url"]["url"]}}
    sent = [{"role": "system", "content": "Shapes."}, {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Look at this."}, {"role": "user", "content": [{"type": "text", "text": "What color is the circle?"}, image]}]
    messages, images = engine_messages(parse_request(json.dumps({"model": MODEL, "messages": sent}).encode()), MediaPolicy())
    assert messages == [{"role": "system", "content": "Shapes.\nBe brief."},
                        {"role": "user", "content": [{"type": "text", "text": "Look at this."},
                                                     {"type": "text", "text": "What color is the circle?"}, {"type": "image"}]}]
    assert len(images) == 1
    assert "red" in ask(client, sent).choices[0].message.content
