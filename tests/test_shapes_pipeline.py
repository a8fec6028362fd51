import json
import random

import pytest

from trainer.shapes import judge, questions
from trainer.shapes.pipeline import run, spoken, vqa_records

THINGS = [{"shape": "circle", "color": "red", "position": "top left"}, {"shape": "square", "color": "blue", "position": "center"},
          {"shape": "triangle", "color": "yellow", "position": "bottom"}]


def test_short_answers_are_sentences_the_judge_accepts():
    answers = {}
    for kind, question, expected in questions(THINGS, random.Random(0)):
        answer = spoken(kind, question, expected)
        assert judge(kind, answer, expected), (question, answer)
        answers[question] = answer
    assert answers["What shape is the blue object?"] == "The blue object is a square."
    assert answers["Where is the red circle?"] == "The red circle is at the top left of the image."
    assert answers["Where is the blue square?"] == "The blue square is in the center of the image."
    assert answers["How many shapes are in the image?"] == "There are three shapes in the image."


def test_vqa_records_are_llava_json():
    (record,) = vqa_records([{"id": "x", "image": "x.png", "things": THINGS}], seed=0)
    assert record["id"] == "x_vqa" and len(record["conversations"]) % 2 == 0
    assert [turn["from"] for turn in record["conversations"][:2]] == ["human", "gpt"]


@pytest.mark.timeout(900)
def test_the_whole_pipeline_runs_end_to_end_in_miniature(tmp_path):
    result = run(tmp_path, train_images=24, test_images=3, seed=0, tower_epochs=1, lm_steps=10, stage1_epochs=1,
                 stage2_epochs=0.5, batch_size=8)
    assert set(result["accuracy"]) == {"color", "shape", "count", "position", "yes/no", "describe"}
    assert result["counts"]["count"] == 3 and result["counts"]["describe"] == 3
    assert json.loads((tmp_path / "results.json").read_text())["timings"].keys() >= {"tower", "stage 1", "stage 2"}
    assert (tmp_path / "stage2" / "model.safetensors").exists() and (tmp_path / "tower" / "open_clip_model.safetensors").exists()
