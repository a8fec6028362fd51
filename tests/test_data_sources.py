"""--data sources: LLaVA JSON/JSONL read back by position from an index, empty data refused, repeated ids legal, and
Hugging Face `datasets` (parquet with embedded images, save_to_disk folders, hub ids), several images per record."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import trainer.sources
from trainer.data import DataError, EmbeddedImage, encode
from trainer.dataset import estimate_lengths, repeated_ids
from trainer.sources import load_records

# Records of llava_v1_5_mix665k.json as released: one COCO image's records share its id; a text-only ShareGPT one.
MIX = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
        {"from": "gpt", "value": "The bus in the image is white and red."}]},
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
        {"from": "human", "value": "What do you see happening in this image?\n<image>"},
        {"from": "gpt", "value": "The scene depicts a lively street with a café — “naïve” art on the wall."}]},
    {"id": "i6IyJda_0", "model": "", "conversations": [
        {"from": "human", "value": "How to tell if a customer segment is well segmented? In 3 bullet points."},
        {"from": "gpt", "value": "1. Homogeneity 2. Distinctiveness 3. Stability"}]},
]


def png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, text", [("empty.json", "[]"), ("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n")])
def test_an_empty_dataset_is_refused_at_once(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match="holds no records"):
        load_records([str(tmp_path / name)], seed=0)


def test_llava_train_on_an_empty_file_stops_with_an_error_instead_of_spinning(parts, tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "--stage", "1", "--vision", parts["clip"], "--llm", parts["llm"],
                             "--data", str(tmp_path / "empty.json"), "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "empty.json: holds no records" in result.stderr


@pytest.mark.parametrize("chunk", [7, 64, 1 << 24])
def test_json_records_are_read_back_by_position_exactly_as_written(tmp_path, monkeypatch, chunk):
    """Chunks smaller than a record, multi-byte characters and odd whitespace: the index still finds each one."""
    monkeypatch.setattr(trainer.sources, "CHUNK", chunk)
    records = MIX * 5
    text = " \n[ " + ",\n\t".join(json.dumps(r, ensure_ascii=False) for r in records) + " ]\n"
    (tmp_path / "mix.json").write_text(text, encoding="utf-8-sig" if chunk == 64 else "utf-8")  # with a BOM, once
    (tmp_path / "mix.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    for name in ("mix.json", "mix.jsonl"):
        loaded = load_records([str(tmp_path / name)], seed=0)
        assert len(loaded) == len(records)
        for index, raw in enumerate(records):
            record = loaded[index]
            assert record.source == f"{tmp_path / name}#{index}" and record.id == raw["id"]
            assert [text for _, text in record.conversations] == [turn["value"] for turn in raw["conversations"]]
        assert loaded.images.tolist() == [1, 1, 0] * 5
        assert loaded.chars.tolist() == [sum(len(t["value"]) for t in r["conversations"]) for r in records]


@pytest.mark.parametrize("text, message", [
    ('[{"id": "a", "conversations": []}, {"id": "b", "conv', "ends inside the list|record 1 .* not valid JSON"),
    ('[{"id": "a", "conversations": []} {"id": "b"}]', "expected ',' or ']' after record 0"),
    ('{"id": "a"}', "expected a JSON list of records"),
    ('[{"id": "a", "conversations": [{"from": "robot", "value": "x"}]}]', "#0 \\(a\\): turn 0 needs 'from'"),
])
def test_a_malformed_json_file_is_refused_naming_the_record(tmp_path, monkeypatch, text, message):
    monkeypatch.setattr(trainer.sources, "CHUNK", 16)
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(DataError, match=message):
        load_records([str(tmp_path / "bad.json")], seed=0)


def test_repeated_ids_are_legal_and_records_are_told_apart_by_position(assembled, tmp_path):
    _, processor = assembled
    (tmp_path / "llava_v1_5_mix665k.json").write_text(json.dumps(MIX))
    records = load_records([str(tmp_path / "llava_v1_5_mix665k.json")], seed=0)
    first, second = records[0], records[1]
    assert first.id == second.id and first.source != second.source and first.conversations != second.conversations
    assert repeated_ids(records) == {"000000033471": 2}
    assert len(estimate_lengths(records, processor)) == 3


def test_check_data_counts_repeated_ids(saved_checkpoint, tmp_path):
    records = [{**record, "image": "a.png"} if "image" in record else record for record in MIX]
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "mix.json").write_text(json.dumps(records))
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "--stage", "2", "--model", str(saved_checkpoint), "--data",
                             str(tmp_path / "mix.json"), "--image-folder", str(tmp_path), "--check-data"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 records checked: 0 problems" in result.stdout and "1 ids are shared by 2 records" in result.stdout


def test_lengths_past_the_exact_limit_come_from_a_measured_rate(assembled, tmp_path, monkeypatch):
    _, processor = assembled
    (tmp_path / "mix.json").write_text(json.dumps(MIX * 40))
    records = load_records([str(tmp_path / "mix.json")], seed=0)
    exact = np.array(estimate_lengths(records, processor))
    monkeypatch.setattr(trainer.dataset, "EXACT_LENGTHS", 10)
    monkeypatch.setattr(trainer.dataset, "RATE_SAMPLE", 10)
    estimated = np.array(estimate_lengths(records, processor))
    assert np.abs(estimated - exact).max() <= 0.2 * exact.max() and not np.array_equal(estimated, exact)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


def embedded_dataset(datasets, several=False):
    """LLaVA columns with images embedded as an `Image` feature (one per record, or a list of two)."""
    images = [png_bytes("red"), png_bytes("blue")]
    rows = {"id": ["000000033471", "000000033471"], "image": [], "conversations": []}
    for number in range(2):
        rows["image"].append([{"bytes": images[0], "path": None}, {"bytes": images[1], "path": None}] if several
                             else {"bytes": images[number], "path": None})
        question = "<image>\nCompare the two pictures." if several else "What colour is it?\n<image>"
        question = question.replace("<image>", "<image> and <image>") if several else question
        rows["conversations"].append([{"from": "human", "value": question}, {"from": "gpt", "value": f"Answer {number}."}])
    image = datasets.Image()
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.List(image) if several else image,
                                  "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")})})
    return datasets.Dataset.from_dict(rows, features=features)


def test_parquet_with_embedded_images_trains_like_files_on_disk(assembled, hf_cache, tmp_path):
    _, processor = assembled
    embedded_dataset(hf_cache).to_parquet(str(tmp_path / "train-00000-of-00001.parquet"))
    for data in (tmp_path / "train-00000-of-00001.parquet", tmp_path, tmp_path / "train-*.parquet"):
        records = load_records([str(data)], seed=0)
        assert len(records) == 2 and records.images.tolist() == [1, 1]
        assert isinstance(records[1].images[0], EmbeddedImage) and records[1].id == "000000033471"
    Image.open(io.BytesIO(png_bytes("blue"))).save(tmp_path / "blue.png")
    embedded = encode(records[1], processor, 0, 256, str(tmp_path))
    on_disk = encode(records[1].__class__("x", ("blue.png",), records[1].conversations, "disk"), processor, 0, 256, str(tmp_path))
    assert torch.equal(embedded.input_ids, on_disk.input_ids) and torch.equal(embedded.pixel_values, on_disk.pixel_values)


def test_a_saved_dataset_with_several_images_per_record(assembled, hf_cache, tmp_path):
    _, processor = assembled
    embedded_dataset(hf_cache, several=True).save_to_disk(str(tmp_path / "saved"))
    records = load_records([str(tmp_path / "saved")], seed=0)
    assert records.images.tolist() == [2, 2]
    encoded = encode(records[0], processor, 0, 256, ".")
    assert encoded.pixel_values.shape[0] == 2
    assert int((encoded.input_ids == processor.image_token_id).sum()) == 2 * processor.image_seq_length
    red, blue = (processor.image_processor(Image.open(io.BytesIO(png_bytes(c))), return_tensors="pt")["pixel_values"] for c in ("red", "blue"))
    assert torch.equal(encoded.pixel_values, torch.cat([red, blue]))  # in the order the record lists them


def test_a_hub_id_loads_its_split_through_datasets(hf_cache, monkeypatch):
    calls = []
    monkeypatch.setattr(hf_cache, "load_dataset", lambda name, split: calls.append((name, split)) or embedded_dataset(hf_cache))
    records = load_records(["liuhaotian/LLaVA-Instruct-150K:validation"], seed=0)
    assert calls == [("liuhaotian/LLaVA-Instruct-150K", "validation")] and len(records) == 2
    with pytest.raises(DataError, match="no such data file"):
        load_records(["data/missing.json"], seed=0)  # a missing local file is never mistaken for a hub id


def test_llava_train_runs_on_parquet_with_several_embedded_images_per_record(saved_checkpoint, hf_cache, tmp_path):
    embedded_dataset(hf_cache, several=True).to_parquet(str(tmp_path / "data.parquet"))
    env = {**__import__("os").environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "--stage", "2", "--model", str(saved_checkpoint), "--data",
                             str(tmp_path / "data.parquet"), "--output", str(tmp_path / "out"), "--batch-size", "2",
                             "--max-steps", "2", "--save-every", "0"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    assert metrics["samples"] == 4 and "skipped" not in result.stdout


def test_the_vision_feature_cache_keys_embedded_images_by_their_bytes(assembled, hf_cache, tmp_path):
    from trainer.dataset import LlavaDataset, unique_images
    from trainer.feature_cache import FeatureCache

    model, processor = assembled
    embedded_dataset(hf_cache, several=True).save_to_disk(str(tmp_path / "saved"))
    records = load_records([str(tmp_path / "saved")], seed=0)
    images = unique_images(records)
    assert len(images) == 2  # two records, the same two embedded images
    cache = FeatureCache(str(tmp_path / "cache"), "key")
    assert cache.build(model, processor, images, ".", 2, "cpu") == {}
    item = LlavaDataset(records, processor, 0, 256, ".", feature_cache=cache)[0]
    pixels = encode(records[0], processor, 0, 256, ".").pixel_values
    assert torch.allclose(item["vision_features"], model.get_vision_features(pixels))


def test_a_json_record_may_list_several_images_and_a_broken_embedded_one_is_named():
    from trainer.data import ImageLoadError, open_image, parse_record, to_messages

    record = parse_record({"id": "pair", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "What differs?"}, {"from": "gpt", "value": "The colour."}]}, "pairs.json#0", seed=0)
    assert record.images == ("a.png", "b.png")
    assert [part["type"] for part in to_messages(record, seed=0)[0]["content"]] == ["image", "image", "text"]
    with pytest.raises(DataError, match="pairs.json#1 \\(x\\): 1 <image> markers for 2 images"):
        to_messages(parse_record({"id": "x", "image": ["a.png", "b.png"], "conversations": [
            {"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A."}]}, "pairs.json#1", seed=0), seed=0)
    broken = EmbeddedImage(png_bytes("red")[:40])
    with pytest.raises(ImageLoadError, match=f"{broken.key} \\(40 embedded bytes\\)"):
        open_image(broken, ".")
