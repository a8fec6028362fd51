"""The assembled Space folder stands on its own: started from its own directory, it serves a chat."""

import os
import subprocess
import sys
import time
from pathlib import Path

from gradio_client import Client, handle_file
from PIL import Image

from test_app import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_assembles_a_space_that_serves_a_chat(saved_checkpoint, tmp_path):
    out = tmp_path / "space"
    result = subprocess.run([sys.executable, "-m", "spaces.deploy", "--space", "someone/llava-demo", "--model", str(saved_checkpoint),
                             "--out", str(out), "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    readme = (out / "README.md").read_text()
    assert "sdk: gradio" in readme and "app_file: app.py" in readme and "transformers>=5.24" in (out / "requirements.txt").read_text()
    assert (out / "checkpoints" / "shapes-llava" / "model.safetensors").exists() and (out / "llava_plugin" / "modeling_llava_plugin.py").exists()

    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("LLAVA_MODEL", "PYTHONPATH")}
    process = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=out, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client, deadline = None, time.monotonic() + 120
        while client is None and time.monotonic() < deadline:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet
                time.sleep(0.5)
        picture = tmp_path / "red.png"
        Image.new("RGB", (40, 30), (255, 0, 0)).save(picture)
        answer = client.predict({"text": "What is it?", "files": [handle_file(str(picture))]}, 0.0, 0.7, 4, api_name="/chat")
        assert isinstance(answer, str) and not answer.startswith(("**No model", "Please", "Sorry"))
    finally:
        process.terminate()
        process.wait(timeout=30)
