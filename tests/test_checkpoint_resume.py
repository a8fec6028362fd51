"""A damaged newest checkpoint never blocks --resume: each checkpoint carries a manifest of its files (sizes, sha256)
written last; resume loads the newest one that matches it and names each damaged one it passes over."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny_components import save_tiny_world

from trainer import checkpoint


def train_args(parts, world, output, *extra):
    return [sys.executable, "-m", "trainer.cli", "--stage", 1, "--vision", parts["clip"], "--llm", parts["llm"],
            "--data", world / "captions.json", "--image-folder", world / "images", "--output", output, "--batch-size", 4,
            "--lr", 1e-2, "--max-steps", 6, "--save-every", 2, "--keep-checkpoints", 2, *extra]


@pytest.fixture(scope="module")
def finished(parts, tmp_path_factory):
    """A 6-step run that kept checkpoint-2 and checkpoint-4, and its final model."""
    world = save_tiny_world(tmp_path_factory.mktemp("world"))
    output = tmp_path_factory.mktemp("run")
    result = subprocess.run(list(map(str, train_args(parts, world, output))), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return world, output


def interrupted_copy(finished_run: Path, destination: Path) -> Path:
    """The run as a kill after checkpoint-4 would have left it: its checkpoints, no final model."""
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(finished_run / name, destination / name)
    return destination


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_the_manifest_lists_every_file_of_the_checkpoint_with_its_size(finished):
    folder = finished[1] / "checkpoint-4"
    listed = json.loads((folder / checkpoint.MANIFEST).read_text())["files"]
    on_disk = {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()} - {checkpoint.MANIFEST}
    assert set(listed) == on_disk and {"model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"} <= on_disk
    assert all(listed[name]["size"] == (folder / name).stat().st_size for name in listed)
    assert checkpoint.damage(folder) is None


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.bin", "scheduler.bin", "trainer_state.json"])
def test_a_truncated_file_sends_resume_to_the_older_checkpoint_with_a_warning(finished, tmp_path, caplog, name):
    output = interrupted_copy(finished[1], tmp_path)
    truncate(output / "checkpoint-4" / name)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert checkpoint.newest_intact(output) == output / "checkpoint-2"
    assert f"checkpoint {output / 'checkpoint-4'} is damaged: {name} is" in caplog.text and "truncated" in caplog.text


def test_a_corrupted_file_of_the_same_size_is_damage_too(finished, tmp_path):
    output = interrupted_copy(finished[1], tmp_path)
    state = output / "checkpoint-4" / "random_states_0.pkl"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    assert "random_states_0.pkl does not match its sha256" in checkpoint.damage(output / "checkpoint-4")
    truncate(output / "checkpoint-2" / "scheduler.bin")
    with pytest.raises(ValueError, match="no intact checkpoint in .*checkpoint-2, checkpoint-4 are damaged"):
        checkpoint.newest_intact(output)


def test_a_checkpoint_from_before_manifests_still_resumes_with_a_warning(finished, tmp_path, caplog):
    output = interrupted_copy(finished[1], tmp_path)
    (output / "checkpoint-4" / checkpoint.MANIFEST).unlink()  # as llava-train wrote them before manifests
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        assert checkpoint.newest_intact(output) == output / "checkpoint-4"
    assert "has no manifest.json (an older llava-train wrote it): loading it unverified" in caplog.text


def test_resume_past_a_damaged_checkpoint_ends_bit_identical(parts, finished, tmp_path):
    world, straight = finished
    output = interrupted_copy(straight, tmp_path)
    truncate(output / "checkpoint-4" / "optimizer.bin")
    result = subprocess.run(list(map(str, train_args(parts, world, output, "--resume"))), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"checkpoint {output / 'checkpoint-4'} is damaged: optimizer.bin" in result.stderr
    assert f"resumed from {output / 'checkpoint-2'} at step 2" in result.stdout
    expected, resumed = load_file(str(straight / "model.safetensors")), load_file(str(output / "model.safetensors"))
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)
    assert checkpoint.damage(output / "checkpoint-4") is None  # step 4 was trained again and saved anew

    for folder in checkpoint.checkpoints(output):
        truncate(folder / "model.safetensors")
    (output / "config.json").unlink()
    result = subprocess.run(list(map(str, train_args(parts, world, output, "--resume"))), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "no intact checkpoint" in result.stderr
