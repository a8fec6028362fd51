"""The assembled Space folder stands on its own: started from its own directory as Spaces start it (`python app.py`
with the server's name and port in the environment, no flags), it serves a chat."""

import os
import subprocess
import sys
from pathlib import Path

from gradio_client import Client, handle_file
from PIL import Image

from app_process import free_port, running_app

ROOT = Path(__file__).resolve().parent.parent


def test_the_documented_command_assembles_a_space_that_starts_as_spaces_start_it(saved_checkpoint, tmp_path):
    out = tmp_path / "space"
    result = subprocess.run([sys.executable, "-m", "spaces.deploy", "--dry-run", "--model", str(saved_checkpoint), "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    readme, requirements = (out / "README.md").read_text(), (out / "requirements.txt").read_text()
    assert "sdk: gradio" in readme and "app_file: app.py" in readme and "](https://github.com/)" not in readme
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in requirements and "transformers>=5.24" in requirements
    assert (out / "checkpoints" / "shapes-llava" / "model.safetensors").exists() and (out / "llava_plugin" / "modeling_llava_plugin.py").exists()

    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in ("LLAVA_MODEL", "PYTHONPATH")}
    env.update(GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))  # Spaces set 0.0.0.0 and 7860
    with running_app([], tmp_path / "space.log", env=env, cwd=out) as (url, _):
        assert url == f"http://127.0.0.1:{port}/"
        picture = tmp_path / "red.png"
        Image.new("RGB", (40, 30), (255, 0, 0)).save(picture)
        answer = Client(url, verbose=False).predict({"text": "What is it?", "files": [handle_file(str(picture))]}, 0.0, 0.7, 4,
                                                    api_name="/chat")
        assert isinstance(answer, str) and answer and not answer.startswith(("Please", "Sorry")), answer


def test_uploading_needs_a_space_name(tmp_path):
    result = subprocess.run([sys.executable, "-m", "spaces.deploy", "--out", str(tmp_path / "x")], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--space USER/NAME is needed to upload" in result.stderr
