"""A real HTTP server on 127.0.0.1 that speaks enough of the OpenAI API for data generation and evaluation: chat
completions, the model list, file upload and batches. It records what it is sent and injects faults on request.

Used by the tests and by bench/bench_datagen.py; nothing here talks to the network beyond loopback.
"""

import email.parser
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "timeout", "malformed", "empty")


def answer_for(messages: list[dict]) -> str:
    """A well-formed answer for the kind the system message asks for, quoting the image's first line."""
    system, image = messages[0]["content"], messages[-1]["content"]
    first_line = image.splitlines()[0]
    if "Write a conversation" in system:
        return (f"Question:\nWhat does the image show?\n===\nAnswer:\nIt shows this: {first_line}\n===\n"
                "Question:\nIs it a photo?\n===\nAnswer:\nYes, it looks like a photo.")
    if "Describe the image in rich detail" in system:
        return f"The picture shows this scene in detail: {first_line}. Everything is clearly visible."
    return f"Question:\nWhy does this scene look like this?\n===\nAnswer:\nFirst, it shows {first_line}. So it is ordinary."


class FakeOpenAI:
    def __init__(self, fault_rate: float = 0.0, faults=FAULTS, latency: float = 0.0, script: list[str] | None = None,
                 timeout_sleep: float = 3.0, retry_after: str = "0.2", seed: int = 0, responder=None):
        self.responder = responder or answer_for  # messages -> the assistant's content
        self.models = ["fake-llava"]  # what GET /models lists
        self.fault_rate, self.faults, self.latency, self.timeout_sleep = fault_rate, faults, latency, timeout_sleep
        self.retry_after = retry_after
        self.script = list(script or [])  # faults for the first requests, in order ("ok" for none)
        self.random = random.Random(seed)
        self.requests: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def next_fault(self) -> str:
        with self.lock:
            if self.script:
                return self.script.pop(0)
            return self.random.choice(self.faults) if self.random.random() < self.fault_rate else "ok"

    def completion(self, body: dict, content: str) -> dict:
        return {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    def run_batch(self, batch_id: str, input_file_id: str):
        lines = []
        for line in self.files[input_file_id].decode().splitlines():
            request = json.loads(line)
            body = self.completion(request["body"], answer_for(request["body"]["messages"]))
            lines.append(json.dumps({"id": f"req-{len(lines)}", "custom_id": request["custom_id"],
                                     "response": {"status_code": 200, "body": body}, "error": None}))
        output_id = f"file-out-{batch_id}"
        self.files[output_id] = "\n".join(lines).encode()
        self.batches[batch_id].update(status="completed", output_file_id=output_id)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real API servers do

            def setup(self):
                super().setup()
                # Headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms per response.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, *args):
                pass

            def reply(self, status: int, payload, headers: dict | None = None, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left: that is the fault
                    pass

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                entry = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "time": time.monotonic(), "raw": raw}
                with fake.lock:
                    fake.requests.append(entry)
                if self.path.endswith("/chat/completions"):
                    return self.chat(json.loads(raw))
                if self.path.endswith("/files"):
                    message = email.parser.BytesParser().parsebytes(
                        b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + raw)
                    content = next(part.get_payload(decode=True) for part in message.get_payload()
                                   if part.get_param("name", header="content-disposition") == "file")
                    file_id = f"file-{len(fake.files)}"
                    fake.files[file_id] = content
                    return self.reply(200, {"id": file_id, "object": "file", "bytes": len(content), "created_at": 0,
                                            "filename": "requests.jsonl", "purpose": "batch", "status": "processed"})
                if self.path.endswith("/batches"):
                    body = json.loads(raw)
                    batch_id = f"batch-{len(fake.batches)}"
                    fake.batches[batch_id] = {"id": batch_id, "object": "batch", "endpoint": body["endpoint"],
                                              "input_file_id": body["input_file_id"], "completion_window": "24h",
                                              "status": "in_progress", "created_at": 0}
                    return self.reply(200, fake.batches[batch_id])
                self.reply(404, {"error": {"message": f"no route {self.path}"}})

            def do_GET(self):
                if self.path.endswith("/models"):
                    return self.reply(200, {"object": "list", "data": [{"id": id_, "object": "model", "created": 0, "owned_by": "fake"}
                                                                        for id_ in fake.models]})
                if "/batches/" in self.path:
                    batch = fake.batches.get(self.path.rsplit("/", 1)[1])
                    return self.reply(200, batch) if batch else self.reply(404, {"error": {"message": "no batch"}})
                if self.path.endswith("/content"):
                    file_id = self.path.split("/")[-2]
                    return self.reply(200, None, raw=fake.files[file_id])
                self.reply(404, {"error": {"message": f"no route {self.path}"}})

            def chat(self, body: dict):
                fault = fake.next_fault()
                if fake.latency:
                    time.sleep(fake.latency)
                if fault == "429":
                    return self.reply(429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": fake.retry_after})
                if fault == "401":
                    return self.reply(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
                if fault == "500":
                    return self.reply(500, {"error": {"message": "server error"}})
                if fault == "timeout":
                    time.sleep(fake.timeout_sleep)  # the client gives up first
                    return self.reply(500, {"error": {"message": "too late"}})
                content = {"malformed": "I cannot follow that format, sorry.", "empty": ""}.get(fault)
                self.reply(200, fake.completion(body, content if content is not None else fake.responder(body["messages"])))

        return Handler
