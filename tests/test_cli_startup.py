"""Every console script answers --help and refuses a wrong flag at once: their heavy imports (torch, transformers,
openai) load only after the command line is parsed."""

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def run(entry: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    module, function = entry.split(":")
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return result, time.monotonic() - started


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_and_a_wrong_flag_answer_within_two_seconds_without_loading_torch(script):
    module, _ = SCRIPTS[script].split(":")
    probe = subprocess.run([sys.executable, "-c", f"import sys, {module}; print('torch' in sys.modules)"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", f"{script}: importing {module} loads torch ({probe.stderr[-300:]})"
    helped, seconds = run(SCRIPTS[script], "--help")
    assert helped.returncode == 0 and "usage:" in helped.stdout, helped.stderr[-500:]
    assert seconds < 2.0, f"{script} --help took {seconds:.1f} s"
    refused, seconds = run(SCRIPTS[script], "--no-such-flag")  # argparse names it, or first the arguments missing
    assert refused.returncode == 2 and f"{script}: error:" in refused.stderr and seconds < 2.0, (seconds, refused.stderr[-300:])


@pytest.mark.parametrize("script, args", [
    ("llava-train", ["--stage", "2", "--model", "./no/such/checkpoint", "--data", "d.json", "--output", "out"]),
    ("llava-eval", ["shapes", "--model", "./no/such/checkpoint", "--output", "out"]),
])
def test_a_mistyped_model_path_is_named_in_one_line_before_anything_loads(script, args):
    result, seconds = run(SCRIPTS[script], *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr and seconds < 3.0, result.stderr[-500:]
    assert "./no/such/checkpoint: no such folder" in result.stderr and "Repo id must be" not in result.stderr
