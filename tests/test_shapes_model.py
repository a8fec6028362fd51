"""The committed default model (checkpoints/shapes-llava): it loads as transformers models do and still answers
held-out questions of every kind about as well as when it was made (CI does not retrain it)."""

import json
from pathlib import Path

import pytest
from transformers import AutoModel, AutoProcessor

import llava_plugin  # noqa: F401  (registers the Auto classes)
from trainer.eval.candidate import Candidate
from trainer.eval.shapes import evaluate_shapes, load_split
from trainer.shapes.world import KINDS, judge, write_split

MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "shapes-llava"


def test_the_committed_model_loads_in_half_precision_and_is_small():
    model = AutoModel.from_pretrained(MODEL)
    processor = AutoProcessor.from_pretrained(MODEL)
    assert str(model.dtype) == "torch.float16" and processor.image_processor.size
    size = sum(path.stat().st_size for path in MODEL.iterdir())
    assert size < 8 * 2**20, f"{size / 2**20:.1f} MB is not 'a few MB'"
    assert "shapes world" in (MODEL / "README.md").read_text().lower()


def test_the_committed_model_is_asked_question_first_unless_a_candidate_is_given_another_template():
    from llava_plugin import llava_v1_chat_template
    from trainer.shapes.pipeline import SYSTEM_PROMPT

    question = "Where is the red circle?"
    own = Candidate(str(MODEL), device="cpu")  # trained with --image-after-text: its template keeps that order
    assert own.prompt(question) == f"{SYSTEM_PROMPT} USER: {question}\n<image> ASSISTANT:"
    assert own.prompt(question, with_image=False) == f"{SYSTEM_PROMPT} USER: {question} ASSISTANT:"
    image_first = Candidate(str(MODEL), device="cpu", chat_template=llava_v1_chat_template(SYSTEM_PROMPT))
    assert image_first.prompt(question) == f"{SYSTEM_PROMPT} USER: <image>\n{question} ASSISTANT:"
    # a follow-up: the image goes after the newest question, the earlier answer is the model's own
    opener = ("How many shapes are in the image?", "There are two shapes in the image.")
    assert own.prompt(question, history=(opener,)) == (
        f"{SYSTEM_PROMPT} USER: {opener[0]} ASSISTANT: {opener[1]}</s>USER: {question}\n<image> ASSISTANT:")


def test_follow_up_questions_are_asked_after_the_models_own_answer_to_the_opener(tmp_path):
    split = write_split(tmp_path, "heldout", 3, seed=2026)
    candidate = Candidate(str(MODEL), device="cpu")
    opener = "How many shapes are in the image?"
    result = evaluate_shapes(candidate, load_split(split), tmp_path / "images", tmp_path / "answers.jsonl",
                             progress=False, opener=opener)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert result["opener"] == opener and sum(result["counts"].values()) == len(answers)
    first = answers[0]
    own_answer = candidate.answer(opener, tmp_path / "images" / first["image"], max_new_tokens=48)
    assert first["history"] == [[opener, own_answer]]
    again = candidate.answer_many([first["question"]], tmp_path / "images" / first["image"], max_new_tokens=48,
                                  history=((opener, own_answer),))
    assert again == [first["answer"]]
    # the same file resumes only the same way of asking: mixed answers would score neither
    for other in (None, "Describe the image."):
        with pytest.raises(ValueError, match="answers.jsonl holds answers to questions asked after \"How many"):
            evaluate_shapes(candidate, load_split(split), tmp_path / "images", tmp_path / "answers.jsonl", progress=False, opener=other)
    resumed = evaluate_shapes(candidate, load_split(split), tmp_path / "images", tmp_path / "answers.jsonl", progress=False, opener=opener)
    assert resumed["accuracy"] == result["accuracy"]


@pytest.mark.timeout(600)
def test_the_committed_model_answers_held_out_questions_of_every_kind(tmp_path):
    made = json.loads((MODEL / "shapes_eval.json").read_text())["accuracy"]
    split = write_split(tmp_path, "heldout", 30, seed=2026)  # scenes the model never saw (training used seed 0)
    result = evaluate_shapes(Candidate(str(MODEL), device="cpu"), load_split(split), tmp_path / "images",
                             tmp_path / "answers.jsonl", progress=False)
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    for kind in KINDS:
        right = [a for a in answers if a["kind"] == kind and a["right"]]
        assert right, f"no {kind} question answered correctly"
        assert judge(kind, right[0]["answer"], right[0]["expected"])
        # 30 images are a small sample: allow for its noise, not for a model that has lost what it knew
        assert result["accuracy"][kind] >= made[kind] - 0.2, (kind, result["accuracy"][kind], made[kind])
    outcomes = result["position_outcomes"]
    assert sum(outcomes.values()) == result["counts"]["position"]
    assert outcomes["right"] == sum(a["right"] for a in answers if a["kind"] == "position")
