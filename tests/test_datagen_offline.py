import json

from trainer.datagen import DatagenConfig, ImageAnnotation, draft_records, generate, parse_record
from trainer.datagen.offline import cell
from trainer.datagen.responses import SOURCE_WORDS

SHAPES = parse_record(
    {"id": "s1", "image": "s1.png", "width": 300, "height": 300,
     "captions": ["a red circle at the top left and a blue square at the bottom right"],
     "boxes": [{"label": "red circle", "bbox": [10, 10, 80, 80]}, {"label": "blue square", "bbox": [220, 210, 290, 290]},
               {"label": "green triangle", "bbox": [120, 120, 180, 180]}, {"label": "green triangle", "bbox": [210, 10, 290, 90]}]},
    "test",
)


def answers(record):
    return [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]


def test_grid_cells_name_the_nine_positions():
    assert [cell((x, y, x, y)) for y in (0.1, 0.5, 0.9) for x in (0.1, 0.5, 0.9)] == [
        "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right"]


def test_offline_drafts_all_three_kinds_with_true_facts():
    records, rejects = draft_records(SHAPES, seed=3)
    assert rejects == [] and [record["id"] for record in records] == ["s1_conversation", "s1_detail", "s1_complex"]
    conversation, detail, complex_ = records
    qa = dict(zip([t["value"].replace("<image>", "").strip() for t in conversation["conversations"][::2]], answers(conversation)))
    assert 3 <= len(qa) <= 5
    facts = {
        "How many green triangles are in the image?": "There are two green triangles.",
        "Where is the red circle?": "The red circle is at the top left of the image.",
        "Where is the blue square?": "The blue square is at the bottom right of the image.",
        "What objects can you see in the image?": "I can see one red circle, one blue square and two green triangles.",
    }
    for question, answer in qa.items():
        if question in facts:
            assert answer == facts[question]
    assert "blue square" in answers(detail)[0] and "red circle" in answers(detail)[0]
    assert len(complex_["conversations"]) == 2


def test_records_are_llava_json_with_one_image_marker_first_turn_only():
    for record in draft_records(SHAPES, seed=0)[0]:
        turns = record["conversations"]
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)
        first = turns[0]["value"]
        assert first.count("<image>") == 1 and (first.startswith("<image>\n") or first.endswith("\n<image>"))
        assert all("<image>" not in turn["value"] for turn in turns[1:])
        assert not any(SOURCE_WORDS.search(answer) for answer in answers(record))


def test_seeded_and_deterministic_and_the_image_goes_both_ways(tmp_path):
    boxes = [{"label": box.label, "bbox": list(box.bbox)} for box in SHAPES.boxes]
    annotations = [parse_record({"id": f"i{n}", "image": "x.png", "width": 300, "height": 300, "captions": ["shapes"],
                                 "boxes": boxes}, "t") for n in range(40)]
    first = [draft_records(a, seed=5)[0] for a in annotations[:3]]
    assert first == [draft_records(a, seed=5)[0] for a in annotations[:3]]
    assert first != [draft_records(a, seed=6)[0] for a in annotations[:3]]
    placements = {record["conversations"][0]["value"].startswith("<image>") for a in annotations
                  for record in draft_records(a, kinds=("detail",), seed=5)[0]}
    assert placements == {True, False}


def test_cli_api_writes_output_and_a_rerun_does_nothing_twice(tmp_path):
    source = tmp_path / "ann.jsonl"
    source.write_text("\n".join(json.dumps({"id": f"i{n}", "image": f"{n}.png", "width": 100, "height": 100,
                                            "captions": [f"picture {n}"], "boxes": [{"label": "dot", "bbox": [n, n, n + 5, n + 5]}]})
                                for n in range(10)))
    config = DatagenConfig(inputs=[str(source)], output=str(tmp_path / "out" / "data.json"), progress_bar=False)
    summary = generate(config)
    assert (summary.jobs, summary.accepted, summary.output_records) == (30, 30, 30)
    data = json.loads((tmp_path / "out" / "data.json").read_text())
    assert [record["id"] for record in data[:3]] == ["i0_conversation", "i0_detail", "i0_complex"]
    again = generate(config)
    assert (again.already_done, again.accepted, again.output_records) == (30, 0, 30)
    assert json.loads((tmp_path / "out" / "data.json").read_text()) == data


def test_image_annotation_is_plain_data():
    assert isinstance(SHAPES, ImageAnnotation) and SHAPES.normalized_boxes()[0] == ("red circle", (10 / 300, 10 / 300, 80 / 300, 80 / 300))


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "ann.jsonl"
    bad.write_text('{"id": "x", "image": "x.png", "width": 10}\n')
    result = subprocess.run([sys.executable, "-m", "trainer.datagen.cli", "--input", str(bad), "--output", str(tmp_path / "o.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "ann.jsonl:1: missing height" in result.stderr and "Traceback" not in result.stderr
    unknown = subprocess.run([sys.executable, "-m", "trainer.datagen.cli", "--input", str(bad), "--output", "o.json", "--types", "poems"],
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "unknown kinds ['poems']" in unknown.stderr


def test_the_openai_backend_without_a_key_says_so_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    annotations = tmp_path / "a.jsonl"
    annotations.write_text('{"id": "x", "image": "x.png", "width": 100, "height": 100, "captions": ["A cat."], "boxes": []}\n')
    env = {key: value for key, value in os.environ.items() if key != "OPENAI_API_KEY"}
    result = subprocess.run([sys.executable, "-m", "trainer.datagen.cli", "--input", str(annotations), "--output",
                             str(tmp_path / "o.json"), "--backend", "openai"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "OPENAI_API_KEY" in result.stderr and "any non-empty key" in result.stderr
