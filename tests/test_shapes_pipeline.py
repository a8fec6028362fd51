import json
import random

import pytest
import torch
from PIL import Image

from trainer.shapes import judge, questions
from trainer.shapes.pipeline import SYSTEM_PROMPT, ShapesSettings, command_line, drafted_subset, run, spoken, vqa_records, where_again
from trainer.shapes.world import KINDS, reading_order

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


def test_vqa_records_ask_one_question_each_and_describe_in_naming_order():
    things = [{"shape": "square", "color": "blue", "position": "top left"}, {"shape": "triangle", "color": "red", "position": "center"},
              {"shape": "circle", "color": "red", "position": "bottom"}]
    records = vqa_records([{"id": "x", "image": "x.png", "things": things}], seed=0)
    assert len(records) == len(questions(things, random.Random(0))) and len({r["id"] for r in records}) == len(records)
    for record in records:
        assert record["image"] == "x.png" and [turn["from"] for turn in record["conversations"]] == ["human", "gpt"]
    answers = {r["conversations"][0]["value"]: r["conversations"][1]["value"] for r in records}
    # By colour, then shape: not in reading order (blue square first) nor in the record's order.
    assert answers["Describe the image."] == "The image shows a red circle and a red triangle and a blue square."
    # The LM's corpus has them in reading order, as the captions do.
    corpus = vqa_records([{"id": "x", "image": "x.png", "things": things}], seed=0, order=reading_order)
    described = next(r["conversations"][1]["value"] for r in corpus if r["conversations"][0]["value"] == "Describe the image.")
    assert described == "The image shows a blue square and a red triangle and a red circle."


def test_follow_ups_ask_each_question_once_some_as_a_second_turn_after_another_of_the_same_image():
    scenes = [{"id": f"x{n}", "image": f"x{n}.png", "things": [
        {"shape": "square", "color": "blue", "position": "top left"}, {"shape": "circle", "color": ("red", "green")[n % 2], "position": "center"}]}
        for n in range(6)]
    alone, chained = vqa_records(scenes, seed=0), vqa_records(scenes, seed=0, follow_ups=2)
    asked = lambda records, image: sorted(turn["value"].removesuffix("\n<image>") for r in records if r["image"] == image
                                          for turn in r["conversations"])
    for scene in scenes:  # the same questions and answers, only grouped otherwise
        assert asked(alone, scene["image"]) == asked(chained, scene["image"])
        two_turns = [r for r in chained if r["image"] == scene["image"] and len(r["conversations"]) == 4]
        assert len(two_turns) == 2
        for record in two_turns:
            assert [t["from"] for t in record["conversations"]] == ["human", "gpt", "human", "gpt"]
            assert record["conversations"][0]["value"] != record["conversations"][2]["value"]
            assert not record["conversations"][2]["value"].startswith("Where is")  # never learnt as a follow-up
            # the image after the second question, where the chat template puts it when a follow-up is asked
            assert record["conversations"][2]["value"].endswith("?\n<image>")
            assert all("<image>" not in turn["value"] for turn in record["conversations"][:2] + record["conversations"][3:])
    assert len({r["id"] for r in chained}) == len(chained) == len(alone) - 2 * len(scenes)
    # which questions follow which is drawn, not fixed by the question order
    seconds = {next(r["conversations"][2]["value"] for r in chained if r["image"] == s["image"] and len(r["conversations"]) == 4)
               for s in scenes}
    assert len(seconds) > 1


def test_where_again_repeats_only_the_one_question_where_samples():
    scenes = [{"id": f"s{index}", "image": f"s{index}.png", "things": THINGS[:index % 3 + 1]} for index in range(30)]
    records = vqa_records(scenes, seed=0, follow_ups=2)
    where = [r for r in records if r["conversations"][0]["value"].startswith("Where is ")]
    chained = [r for r in where if len(r["conversations"]) > 2]  # a "Where is ...?" opening a two-turn sample
    assert chained and len(where) - len(chained) > 30
    where = [r for r in where if r not in chained]
    again = where_again(records, copies=3)
    assert len(again) == 3 * len(where)
    assert len({r["id"] for r in records + again}) == len(records) + len(again)
    assert sorted(json.dumps(r["conversations"]) for r in again) == sorted(json.dumps(r["conversations"]) for r in where * 3)
    assert where_again(records, copies=0) == []


def test_the_command_line_names_what_differs_from_the_defaults_booleans_included():
    assert command_line(ShapesSettings(ablations=True, report="docs/shapes")) == "llava-shapes --ablations --report docs/shapes"
    assert command_line(ShapesSettings(image_after_text=False, position_embedding_norm=0.0, length_bucket=1)) == \
        "llava-shapes --position-embedding-norm 0.0 --no-image-after-text --length-bucket 1"


def test_one_drafted_kind_per_image_in_turn():
    drafted = [{"id": f"{image}_{kind}", "image": f"{image}.png"} for image in "abcd" for kind in ("conversation", "detail", "complex")]
    chosen = drafted_subset(drafted)
    assert [record["id"] for record in chosen] == ["a_conversation", "b_detail", "c_complex", "d_conversation"]


@pytest.mark.timeout(900)
def test_the_whole_pipeline_runs_end_to_end_in_miniature_with_ablations_report_and_export(tmp_path):
    settings = ShapesSettings(output=str(tmp_path / "run"), train_images=24, test_images=3, tower_steps=2, tower_scenes=8, lm_steps=10,
                              stage2_epochs=0.5, batch_size=8, ablations=True, report=str(tmp_path / "docs"),
                              export=str(tmp_path / "export"))
    result = run(settings)
    assert list(result["variants"]) == ["two stages, layer -2", "stage 2 only", "two stages, layer -1"]
    for variant in result["variants"].values():
        assert set(variant["accuracy"]) == set(KINDS)
        assert variant["counts"]["count"] == 3 and variant["counts"]["describe"] == 3
    assert result["timings"].keys() >= {"foundation: vision tower", "stage 1 (full)", "stage 2 (full)", "stage 2 (no-stage1)",
                                        "stage 1 (layer-1)"}
    assert "stage 1 (no-stage1)" not in result["timings"]
    assert json.loads((tmp_path / "run" / "stage2-layer-1" / "config.json").read_text())["vision_feature_layer"] == -1
    report = (tmp_path / "docs" / "report.md").read_text()
    assert "| question | target | two stages, layer -2 | stage 2 only | two stages, layer -1 |" in report
    # one line per variant, and one per diagnostic: the full model asked follow-ups, and with the image first
    assert report.count("Answers to \"Where is ...?\" named: right ") == 5
    assert "| question | target | first question | follow-up | image first |" in report
    assert {"evaluation (full-follow-up)", "evaluation (full-image-first)"} <= result["timings"].keys()
    for diagnostic in result["diagnostics"].values():
        assert diagnostic["counts"] == result["variants"]["two stages, layer -2"]["counts"]
    follow_ups = [json.loads(line) for line in (tmp_path / "run" / "eval-full-follow-up.answers.jsonl").read_text().splitlines()]
    assert all(entry["history"][0][0] == "How many shapes are in the image?" for entry in follow_ups)
    assert "llava-shapes --train-images 24 " in report and "--ablations" in report and "stage 2 (full)" in report
    assert "started at norm 13" in report and "--image-after-text" not in report.split("```")[1]  # the default now
    assert Image.open(tmp_path / "docs" / "accuracy.png").size == (900, 420)

    from transformers import AutoModel, AutoProcessor
    exported = AutoModel.from_pretrained(tmp_path / "export")
    assert exported.dtype == torch.float16 and (tmp_path / "export" / "README.md").exists()
    prompt = AutoProcessor.from_pretrained(tmp_path / "export").apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}], add_generation_prompt=True)
    # trained with the short system prompt and the question before the image
    assert prompt == f"{SYSTEM_PROMPT} USER: Describe the image.\n<image> ASSISTANT:"

    trained = {path: path.stat().st_mtime_ns for path in (tmp_path / "run").glob("*/*.safetensors")}
    again = run(settings)  # everything is there: nothing is trained or evaluated again
    assert again["timings"] == result["timings"] and len(trained) == 7
    assert {path: path.stat().st_mtime_ns for path in trained} == trained
    with pytest.raises(SystemExit, match="other settings"):
        run(ShapesSettings(**{**settings.__dict__, "seed": 1}))
