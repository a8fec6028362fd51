"""llava-eval mc: ScienceQA's files as released (problems.json with pid_splits.json beside it), the two published
prompt formats, answers read as the original's eval_science_qa.py reads them, and the paper's columns."""

import json

import pytest

from llava_plugin import ImageLoadError
from trainer.eval.multiple_choice import (PRESETS, Problem, evaluate_multiple_choice, load_jsonl_problems, parse_choice,
                                          prompt_builder, read_choice)
from trainer.eval.scienceqa import COLUMNS, load_scienceqa

OPTIONS = ["red", "green", "blue"]


@pytest.mark.parametrize("answer, expected", [
    ("A", 0), (" B ", 1), ("C. blue", 2), ("The answer is B.", 1), ("Because so. The answer is C", 2), ("C\n", 2),
    ("A magnet.", None), ("(B) green", None), ("blue", None), ("the answer is (C)", None), ("The answer is D.", None),
    ("D", None), ("AB", None), ("", None), ("B.green", None)])
def test_answers_are_read_as_the_originals_eval_script_reads_them(answer, expected):
    assert read_choice(answer, OPTIONS) == expected


@pytest.mark.parametrize("answer, expected", [
    ("The answer is B.", 1), ("the answer is (C)", 2), ("A", 0), ("(B) green", 1), ("C. blue", 2), ("blue", 2),
    ("Blue.", 2), ("The answer is D.", None), ("I am not sure.", None), ("An apple", None), ("", None)])
def test_the_lenient_reader(answer, expected):
    assert parse_choice(answer, OPTIONS) == expected


def problem(**fields):
    base = {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "hint": "", "image": None,
            "subject": "natural science", "grade": "grade3", "split": "test", "lecture": "", "solution": ""}
    return base | fields


@pytest.fixture
def scienceqa(tmp_path):
    problems = {"7": problem(hint="Look  closely.", image="image.png"),
                "8": problem(subject="language science", grade="grade8"),
                "9": problem(subject="social science", grade="grade11", hint="A map.", split="val"),
                "10": problem(split="train")}
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    (tmp_path / "pid_splits.json").write_text(json.dumps({"train": ["10"], "val": ["9"], "test": ["8", "7"],
                                                          "minival": ["9"], "minitest": ["7", "9"]}))
    return tmp_path / "problems.json"


def test_scienceqa_splits_come_from_pid_splits_json(scienceqa):
    assert [p.id for p in load_scienceqa(scienceqa, "minitest")] == ["7", "9"]  # the split's own order
    first, second = load_scienceqa(scienceqa, "test")
    assert (first.id, second.id) == ("8", "7")
    assert (second.answer, second.context, second.image) == (1, "Look  closely.", "test/7/image.png")
    assert load_scienceqa(scienceqa, "minival")[0].image is None
    assert second.groups == ("NAT", "TXT", "IMG", "G1-6") and first.groups == ("LAN", "NO", "G7-12")
    with pytest.raises(ValueError, match=r"pid_splits.json: no split 'dev' \(it has train, val, test, minival, minitest\)"):
        load_scienceqa(scienceqa, "dev")
    (scienceqa.parent / "pid_splits.json").unlink()  # without the file: each problem's own split field
    assert [p.id for p in load_scienceqa(scienceqa, "test")] == ["7", "8"]


def test_the_published_prompt_formats(scienceqa):
    (second, nine) = load_scienceqa(scienceqa, "minitest")
    eight = load_scienceqa(scienceqa, "test")[0]
    # LLaVA's QCM-LEA: the question, then its context and options, double spaces collapsed
    assert PRESETS["qcm-lea"](second) == "Which is a mammal?\nContext: Look closely.\nOptions: (A) shark (B) whale"
    assert PRESETS["qcm-lea"](eight) == "Which is a mammal?\nContext: N/A\nOptions: (A) shark (B) whale"
    # LLaVA-1.5's single prediction
    assert PRESETS["llava-1.5"](second) == ("Context: Look closely.\nWhich is a mammal?\nA. shark\nB. whale\n"
                                            "Answer with the option's letter from the given choices directly.")
    assert PRESETS["llava-1.5"](eight).startswith("Which is a mammal?\nA. shark\nB. whale\nAnswer with")
    assert prompt_builder("Q: {question} {options}")(eight) == "Q: Which is a mammal? (A) shark (B) whale"
    with pytest.raises(ValueError, match="neither a preset"):
        prompt_builder("llava-2")


def test_accuracy_per_column_from_what_the_model_said(tmp_path):
    groups = [("NAT", "TXT", "G1-6"), ("NAT", "IMG", "G1-6"), ("SOC", "NO", "G7-12"), ("LAN", "TXT", "IMG", "G7-12")]
    problems = [Problem(f"p{n}", f"Which colour is {n}?", OPTIONS, n % 3, groups=g) for n, g in enumerate(groups)]
    said = {"p0": "A", "p1": "A magnet.", "p2": "The answer is C.", "p3": "A"}
    asked = []

    def answer(p, text):
        asked.append(text)
        if p.id == "p1" and not (tmp_path / "fixed").exists():
            raise ImageLoadError("cannot read image p1.png")
        return said[p.id]

    scores = evaluate_multiple_choice(problems, answer, tmp_path / "a.jsonl", PRESETS["qcm-lea"], progress=False, order=COLUMNS)
    assert list(scores) == ["NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "overall"]
    assert scores["NAT"] == {"accuracy": 0.5, "questions": 2, "unparsed": 0, "failed": 1}
    assert scores["IMG"]["accuracy"] == 1 / 2 and scores["G7-12"]["accuracy"] == 1.0 and scores["overall"]["accuracy"] == 0.75
    assert asked[0] == "Which colour is 0?\nContext: N/A\nOptions: (A) red (B) green (C) blue"
    again = evaluate_multiple_choice(problems, answer, tmp_path / "a.jsonl", PRESETS["qcm-lea"], progress=False, order=COLUMNS)
    assert again == scores and len(asked) == 5  # resumed; only the unreadable one was tried again
    (tmp_path / "fixed").touch()
    fixed = evaluate_multiple_choice(problems, answer, tmp_path / "a.jsonl", PRESETS["qcm-lea"], progress=False, order=COLUMNS)
    assert fixed["overall"] == {"accuracy": 0.75, "questions": 4, "unparsed": 1, "failed": 0}  # "A magnet." is not A


def test_jsonl_problems_and_their_errors(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"id": 1, "question": "q", "options": ["x", "y"], "answer": "B", "subject": "s"}) + "\n"
                    + json.dumps({"id": 2, "question": "q", "options": ["x", "y"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=r"mc.jsonl:2: answer 5"):
        load_jsonl_problems(path)
    path.write_text(json.dumps({"id": 1, "question": "q", "options": ["x", "y"], "answer": "B", "subject": "s"}))
    (only,) = load_jsonl_problems(path)
    assert (only.answer, only.groups) == (1, ("s",))
