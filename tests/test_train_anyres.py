"""Both training stages with an AnyRes model: images of different sizes give samples of different image token
counts in one batch; stage 1 trains W and the row-end embedding, stage 2 the language model too."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train_run import train
from tiny_components import save_tiny_world
from transformers import AutoProcessor

from trainer.batching import Collator
from trainer.data import encode
from trainer.sources import load_records

PINPOINTS = "32x64,64x32,64x64"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return save_tiny_world(tmp_path_factory.mktemp("world"))


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def stage1(parts, world, tmp_path_factory):
    output = tmp_path_factory.mktemp("anyres-stage1")
    result = train("--stage", 1, "--vision", parts["clip"], "--llm", parts["llm"], "--image-grid-pinpoints", PINPOINTS,
                   "--data", world / "captions.json", "--image-folder", world / "images", "--output", output,
                   "--batch-size", 4, "--lr", 1e-2, "--max-steps", 3, "--log-every", 1)
    return output, result


def test_a_batch_holds_samples_of_different_image_token_counts(stage1, world):
    output, _ = stage1
    processor = AutoProcessor.from_pretrained(output)
    records = load_records([str(world / "captions.json")], 0)
    items = [encode(record, processor, 0, 512, str(world / "images")) for record in (records[index] for index in range(4))]
    counts = {int((item.input_ids == processor.image_token_id).sum()) for item in items}
    assert len(counts) > 1  # the world's images differ in aspect, so in tokens
    batch = Collator(processor.tokenizer.pad_token_id)([{"id": str(i), "input_ids": item.input_ids, "labels": item.labels,
                                                         "pixel_values": item.pixel_values, "image_sizes": item.image_sizes}
                                                        for i, item in enumerate(items)])
    assert batch["image_sizes"].shape == (4, 2) and batch["pixel_values"].shape[0] == sum(item.pixel_values.shape[0] for item in items)


def test_stage1_trains_the_projector_and_the_newline_only(parts, stage1):
    output, result = stage1
    assert "image_newline (32 parameters)" in result.stdout and "language_model (" not in result.stdout
    after = weights(output)
    from transformers import AutoConfig
    assert AutoConfig.from_pretrained(output).image_grid_pinpoints == [[32, 64], [64, 32], [64, 64]]
    assert "image_newline" in after
    llm = load_file(str(Path(parts["llm"]) / "model.safetensors"))
    assert all(torch.equal(after[f"language_model.{key}"], value) for key, value in llm.items() if key != "model.embed_tokens.weight"
               and key != "lm_head.weight")


def test_stage2_continues_the_anyres_model_and_trains_the_language_model(stage1, world, tmp_path):
    first, _ = stage1
    train("--stage", 2, "--model", first, "--data", world / "instruct.json", "--image-folder", world / "images",
          "--output", tmp_path, "--batch-size", 4, "--lr", 1e-3, "--max-steps", 2, "--log-every", 1)
    before, after = weights(first), weights(tmp_path)
    assert not torch.equal(before["language_model.model.layers.0.mlp.up_proj.weight"], after["language_model.model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["image_newline"], after["image_newline"])
    assert all(torch.equal(before[key], after[key]) for key in before if key.startswith("vision_tower."))


def test_malformed_pinpoints_and_the_feature_cache_are_refused(parts, world, tmp_path):
    result = train("--stage", 1, "--vision", parts["clip"], "--llm", parts["llm"], "--image-grid-pinpoints", "32by64",
                   "--data", world / "captions.json", "--output", tmp_path / "a", check=False)
    assert result.returncode != 0 and "HEIGHTxWIDTH" in result.stderr
    result = train("--stage", 1, "--vision", parts["clip"], "--llm", parts["llm"], "--image-grid-pinpoints", PINPOINTS,
                   "--cache-vision-features", tmp_path / "cache", "--data", world / "captions.json",
                   "--image-folder", world / "images", "--output", tmp_path / "b", "--max-steps", 1, check=False)
    assert result.returncode != 0 and "not supported for AnyRes" in result.stderr
