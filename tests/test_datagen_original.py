"""llava-datagen with the original LLaVA's files: caps_boxes input records (normalized `instances`) read directly,
and `--prompts DIR` reading the original's prompt folder layout. The folder here is a stand-in with made-up text, in
the original's file names and structure."""

import json

import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from trainer.datagen import AnnotationError, DatagenConfig, generate, load_annotations, symbolic_text
from trainer.datagen.cli import main as datagen_main
from trainer.datagen.preview import draw_boxes
from trainer.datagen.prompt_sets import load_prompt_folder

CAPS_BOXES = [
    {"id": "000000441147", "image": "000000441147.jpg", "captions": ["A plate of donuts.", "Sweets on a table."],
     "instances": [{"category": "donut", "bbox": [0.37, 0.584, 0.504, 0.709]}, {"category": "dining table", "bbox": [0, 0.5, 1, 1.0]}]},
    {"id": "000000296284", "image": "000000296284.jpg", "captions": ["A brown dog lies on the grass."], "instances": []},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_caps_boxes_records_are_read_directly(tmp_path):
    first, second = load_annotations([write_jsonl(tmp_path / "caps.jsonl", CAPS_BOXES)])
    assert (first.id, first.image, first.width) == ("000000441147", "000000441147.jpg", None)
    assert symbolic_text(first) == ("A plate of donuts.\nSweets on a table.\n"
                                    "donut: [0.37, 0.584, 0.504, 0.709]\ndining table: [0.0, 0.5, 1.0, 1.0]")
    assert symbolic_text(second) == "A brown dog lies on the grass."
    drawn = draw_boxes(Image.new("RGB", (200, 100), "white"), first)  # normalized boxes scale to the picture
    assert drawn.getpixel((74, 70)) == (255, 0, 255)
    summary = generate(DatagenConfig(inputs=[str(tmp_path / "caps.jsonl")], output=str(tmp_path / "out.json"), progress_bar=False))
    assert summary.accepted == 6
    assert [r["image"] for r in json.loads((tmp_path / "out.json").read_text())][:3] == ["000000441147.jpg"] * 3


@pytest.mark.parametrize("instance, message", [
    ({"category": "cat", "bbox": [0.5, 0.1, 0.4, 0.2]}, r"instances\[0\] \(cat\) is not a normalized"),
    ({"category": "cat", "bbox": [10, 20, 30, 40]}, r"instances\[0\] \(cat\) is not a normalized"),
    ({"bbox": [0.1, 0.1, 0.2, 0.2]}, r"instances\[0\] must be")])
def test_bad_caps_boxes_records_name_the_line(tmp_path, instance, message):
    path = write_jsonl(tmp_path / "caps.jsonl", [CAPS_BOXES[1], {"id": "x", "image": "x.jpg", "captions": [], "instances": [instance]}])
    with pytest.raises(AnnotationError, match=rf"caps.jsonl:2: {message}"):
        load_annotations([path])


FOLDERS = {"conversation": "conversation", "detail": "detail_description", "complex": "complex_reasoning"}


def write_prompt_folder(root):
    """The original's layout with stand-in text: system_message.txt and NNN_caps.txt / NNN_conv.txt pairs."""
    for kind, folder in FOLDERS.items():
        (root / folder).mkdir(parents=True)
        (root / folder / "system_message.txt").write_text(f"Stand-in system message for {kind}.\n")
        for number in range(2 if kind == "conversation" else 3):
            (root / folder / f"{number:03d}_caps.txt").write_text(f"stand-in context {kind} {number}\n")
            (root / folder / f"{number:03d}_conv.txt").write_text(f"stand-in answer {kind} {number}\n")
    return root


def drafts(messages):
    system = messages[0]["content"]
    if "for detail" in system:
        return "A plate of donuts sits on a table."
    return "Question:\nWhat is on the plate?\n===\nAnswer:\nDonuts are on the plate."


def test_the_originals_prompt_folder_is_sent_as_system_then_few_shot_turns(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    prompts = write_prompt_folder(tmp_path / "prompts")
    annotations = write_jsonl(tmp_path / "caps.jsonl", CAPS_BOXES[:1])
    with FakeOpenAI(responder=drafts) as server:
        code = datagen_main(["--input", str(annotations), "--output", str(tmp_path / "out.json"), "--backend", "openai",
                             "--base-url", server.base_url, "--prompts", str(prompts), "--concurrency", "1"])
        bodies = [json.loads(r["raw"]) for r in server.requests if r["path"].endswith("/chat/completions")]
    assert code == 0 and len(json.loads((tmp_path / "out.json").read_text())) == 3
    by_kind = {body["messages"][0]["content"].split(" for ")[1].rstrip("."): body["messages"] for body in bodies}
    conversation = by_kind["conversation"]
    assert conversation[:5] == [
        {"role": "system", "content": "Stand-in system message for conversation."},
        {"role": "user", "content": "stand-in context conversation 0"},
        {"role": "assistant", "content": "stand-in answer conversation 0"},
        {"role": "user", "content": "stand-in context conversation 1"},
        {"role": "assistant", "content": "stand-in answer conversation 1"}]
    # conversations see the captions only; the other two kinds the captions, a blank line and the boxes
    assert conversation[5:] == [{"role": "user", "content": "A plate of donuts.\nSweets on a table."}]
    boxes = "A plate of donuts.\nSweets on a table.\n\ndonut: [0.37, 0.584, 0.504, 0.709]\ndining table: [0.0, 0.5, 1.0, 1.0]"
    for kind in ("detail", "complex"):
        assert len(by_kind[kind]) == 1 + 2 * 3 + 1 and by_kind[kind][-1] == {"role": "user", "content": boxes}
        assert by_kind[kind][6] == {"role": "assistant", "content": f"stand-in answer {kind} 2"}


def test_a_broken_prompt_folder_is_named_before_any_request(tmp_path, capsys):
    prompts = write_prompt_folder(tmp_path / "prompts")
    (prompts / "complex_reasoning" / "001_conv.txt").unlink()
    with pytest.raises(AnnotationError, match=r"complex_reasoning/001_caps.txt: no 001_conv.txt"):
        load_prompt_folder(prompts)
    assert load_prompt_folder(prompts, ("conversation",)).few_shots["conversation"][1][1] == "stand-in answer conversation 1"
    annotations = write_jsonl(tmp_path / "caps.jsonl", CAPS_BOXES[:1])
    assert datagen_main(["--input", str(annotations), "--output", str(tmp_path / "o.json"), "--prompts", str(tmp_path)]) == 2
    assert "--prompts is for the openai backend" in capsys.readouterr().err
