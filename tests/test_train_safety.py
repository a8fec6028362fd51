"""llava-train never loses a run silently: the shipped fp16 model fine-tunes to finite weights (in fp32, saved back
in fp16), a diverging run stops with the step named and its last good checkpoint kept, and a newcomer can fine-tune
the shipped model on a few of their own images on a CPU and chat with the result."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from tiny_components import save_tiny_world, user_turn

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "shapes-llava"


def train(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, args)], capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def own_images(tmp_path_factory):
    """What a newcomer brings: a few pictures of their own and a LLaVA JSON about them."""
    folder = tmp_path_factory.mktemp("own")
    records = []
    for index, (colour, shape) in enumerate([("red", "circle"), ("blue", "square"), ("green", "circle"), ("yellow", "square")]):
        image = Image.new("RGB", (120, 90), "white")
        draw = ImageDraw.Draw(image)
        (draw.ellipse if shape == "circle" else draw.rectangle)((40, 25, 80, 65), fill=colour)
        image.save(folder / f"photo{index}.png")
        records.append({"id": f"photo{index}", "image": f"photo{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": f"The {shape} is {colour}."}]})
    (folder / "mine.json").write_text(json.dumps(records))
    return folder


def test_a_newcomer_fine_tunes_the_shipped_model_on_their_own_images_and_chats_with_it(own_images, tmp_path):
    from engine import ChatEngine

    # bf16 autocast on a CPU over an fp16 checkpoint: it stopped with "mixed dtype (CPU)"; pure fp16 went NaN at step 2
    result = train("--stage", 2, "--model", SHIPPED, "--data", own_images / "mine.json", "--image-folder", own_images,
                   "--output", tmp_path, "--batch-size", 2, "--max-steps", 4, "--lr", 2e-5, "--mixed-precision", "bf16")
    assert "saved the final model (float16)" in result.stdout
    shipped, tuned = load_file(str(SHIPPED / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert set(tuned) == set(shipped)  # tied embeddings still saved once
    assert {tensor.dtype for tensor in tuned.values()} == {torch.float16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float16"
    assert [key for key, tensor in tuned.items() if not torch.isfinite(tensor).all()] == []
    assert any(not torch.equal(shipped[key], tuned[key]) for key in shipped if key.startswith("language_model."))
    engine = ChatEngine(str(tmp_path), device="cpu")
    assert engine.model.dtype == torch.float32  # a float16 checkpoint computes in float32 on a CPU (chat.compute_dtype)
    answer = list(engine.stream([user_turn("What color is the circle?", image_first=False)],
                                Image.open(own_images / "photo0.png"), temperature=0.0, max_new_tokens=16))[-1]
    assert answer.strip()


def test_trainable_weights_and_optimizer_state_are_fp32_whatever_the_checkpoint_dtype():
    from llava_plugin import LlavaPluginForConditionalGeneration
    from trainer.precision import cast_for_saving, nonfinite_tensors, set_training_dtypes
    from trainer.stages import freeze

    model = LlavaPluginForConditionalGeneration.from_pretrained(SHIPPED)
    assert model.dtype == torch.float16
    freeze(model, 2)
    assert set_training_dtypes(model, "no") == torch.float16  # the dtype the final model goes back to
    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}  # no autocast: fp32 compute
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad])
    model(input_ids=torch.tensor([[1, 5, 9]]), labels=torch.tensor([[1, 5, 9]])).loss.backward()
    optimizer.step()
    assert {state["exp_avg_sq"].dtype for state in optimizer.state.values()} == {torch.float32}

    # A bf16 checkpoint under bf16 autocast keeps its frozen tower in bf16 (half the memory); what trains is fp32.
    model = model.to(torch.bfloat16)
    freeze(model, 2)
    set_training_dtypes(model, "bf16")
    assert {parameter.dtype for parameter in model.vision_tower.parameters()} == {torch.bfloat16}
    assert {parameter.dtype for parameter in model.parameters() if parameter.requires_grad} == {torch.float32}
    # an fp32 weight past fp16's range is not finite once saved in fp16, and is caught
    assert nonfinite_tensors(cast_for_saving({"big": torch.tensor([7e4]), "fine": torch.tensor([1.0])}, torch.float16)) == ["big"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return save_tiny_world(tmp_path_factory.mktemp("world"))


@pytest.fixture
def in_process():
    """llava-train's main() run inside pytest: Accelerate's process-wide state is reset afterwards."""
    from accelerate.state import AcceleratorState

    from trainer.cli import main

    yield main
    AcceleratorState._reset_state(reset_partial_state=True)


def stage2_args(parts, world, output, *extra):
    return ["--stage", 2, "--vision", parts["clip"], "--llm", parts["llm"], "--data", world / "instruct.json",
            "--image-folder", world / "images", "--output", output, "--batch-size", 4, "--log-every", 1, *extra]


def test_save_dtype_sets_the_final_models_dtype(parts, world, tmp_path):
    train(*stage2_args(parts, world, tmp_path, "--max-steps", 2, "--save-dtype", "bfloat16"))
    assert {tensor.dtype for tensor in load_file(str(tmp_path / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["text_config"]["dtype"] == "bfloat16"


def test_a_diverging_run_stops_naming_the_step_and_keeps_its_last_good_checkpoint(parts, world, tmp_path):
    result = train(*stage2_args(parts, world, tmp_path, "--lr", 1e6, "--max-steps", 8, "--save-every", 1,
                                "--skip-nonfinite", 2), check=False)
    assert result.returncode == 3, result.stderr[-4000:]
    from trainer.checkpoint import damage
    found = re.search(r"step (\d+): loss \S+, gradient norm \S+: training diverged and stopped after skipping 2 non-finite "
                      r"batches \(--skip-nonfinite 2\); no final model was saved; the last good checkpoint is (\S+)", result.stderr)
    assert found, result.stderr[-2000:]
    step, last_good = int(found.group(1)), Path(found.group(2))
    assert result.stdout.count(f"step {step}: ") == 2 and "skipped this batch (2 of --skip-nonfinite 2)" in result.stdout
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "config.json").exists()
    assert last_good == tmp_path / f"checkpoint-{step - 1}" and damage(last_good) is None
    assert all(torch.isfinite(tensor).all() for tensor in load_file(str(last_good / "model.safetensors")).values())
    assert [entry["step"] for entry in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())] == list(range(1, step))


def test_a_non_finite_batch_within_the_budget_is_skipped_and_counted(parts, world, tmp_path, monkeypatch, capsys, in_process):
    from trainer import loop

    calls = []

    def sometimes_nan(model, batch, tokenizer):
        calls.append(1)
        loss = real_loss(model, batch, tokenizer)
        return loss * float("nan") if len(calls) == 3 else loss

    real_loss = loop.training_loss
    monkeypatch.setattr(loop, "training_loss", sometimes_nan)
    assert in_process([*map(str, stage2_args(parts, world, tmp_path, "--lr", 1e-3, "--max-steps", 4, "--skip-nonfinite", 1))]) == 0
    out = capsys.readouterr().out
    assert "step 3: loss nan" in out and "skipped 1 batch(es) with a non-finite loss or gradient" in out
    metrics = json.loads((tmp_path / "train_metrics.json").read_text())
    assert (metrics["steps"], metrics["nonfinite_skipped"], len(calls)) == (4, 1, 5)  # the skipped batch was replaced
    assert all(torch.isfinite(tensor).all() for tensor in load_file(str(tmp_path / "model.safetensors")).values())
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [entry["nonfinite_skipped"] for entry in logged] == [0, 0, 1, 1]
    assert all(entry["loss"] == entry["loss"] for entry in logged)  # the skipped batch's NaN stays out of the curve


def test_report_to_refuses_a_tracker_whose_package_is_missing():
    from trainer.settings import parse_settings

    if importlib.util.find_spec("wandb"):
        pytest.skip("wandb is installed here")
    # Accelerate alone drops a missing tracker without a word: the run would log nowhere
    with pytest.raises(ValueError, match="--report-to wandb needs the wandb package, which is not installed: pip install wandb"):
        parse_settings(["--model", "m", "--data", "d.json", "--report-to", "wandb"])
    with pytest.raises(ValueError, match="--report-to neptune: not a tracker llava-train knows"):
        parse_settings(["--model", "m", "--data", "d.json", "--report-to", "neptune"])


def test_each_logging_step_reaches_accelerates_trackers(parts, world, tmp_path, monkeypatch, in_process):
    """Through Accelerate's tracker interface, as tensorboard or wandb get it (neither is a dependency): a tracker
    registered under a test name stands in for them."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker

    from trainer import settings

    received = []

    class MemoryTracker(GeneralTracker):
        name = "llava_test_memory"
        requires_logging_directory = False

        def __init__(self, run_name, **kwargs):
            super().__init__()

        @property
        def tracker(self):
            return received

        def store_init_configuration(self, values):
            received.append(("config", values))

        def log(self, values, step=None, **kwargs):
            received.append((step, values))

    monkeypatch.setitem(LOGGER_TYPE_TO_CLASS, MemoryTracker.name, MemoryTracker)
    monkeypatch.setitem(settings.TRACKERS, MemoryTracker.name, ("json",))
    assert in_process([*map(str, stage2_args(parts, world, tmp_path, "--max-steps", 3, "--report-to", MemoryTracker.name))]) == 0
    assert received[0][0] == "config" and received[0][1]["max_steps"] == 3
    assert [step for step, _ in received[1:]] == [1, 2, 3]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"} <= set(values) for _, values in received[1:])
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [entry["loss"] for entry in logged] == [values["loss"] for _, values in received[1:]]


def test_tensorboard_gets_the_curve_when_installed(parts, world, tmp_path):
    if not any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX")):
        pytest.skip("neither tensorboard nor tensorboardX is installed")
    train(*stage2_args(parts, world, tmp_path, "--max-steps", 2, "--report-to", "tensorboard"))
    assert list(tmp_path.glob("llava-train/**/events.out.tfevents.*"))
