"""`python app.py ...` as a real server on loopback for the tests: started, waited for (bounded), always stopped."""

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app.py"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def peak_memory_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM) so far, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc")


@contextlib.contextmanager
def running_app(args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None, wait_s: float = 120):
    """Yields (url, process) once the app listens; `env` replaces the environment (LLAVA_MODEL is never inherited)."""
    env = {key: value for key, value in (os.environ if env is None else env).items() if key != "LLAVA_MODEL"}
    script = "app.py" if cwd else str(APP)  # a folder of its own (an assembled Space) runs its own app.py
    if "--port" in args:
        port = int(args[args.index("--port") + 1])
    elif "GRADIO_SERVER_PORT" in env:
        port = int(env["GRADIO_SERVER_PORT"])
    else:
        port = free_port()
        args = [*args, "--port", str(port)]
    with open(log, "w") as output:
        process = subprocess.Popen([sys.executable, script, *args], stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            if process.poll() is not None:
                pytest.fail(f"app exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"app did not start within {wait_s} s: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
