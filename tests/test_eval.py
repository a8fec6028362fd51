"""llava-eval: the judged relative score against the loopback OpenAI server (scores computed from what the judge
returns), multiple-choice accuracy on a tiny set made here, and the CLI end to end on a tiny checkpoint."""

import json
import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from trainer.eval.cli import main as eval_main
from trainer.eval.judge import (JUDGE_SYSTEM, REFERENCE_SYSTEM, JudgeSettings, load_questions, parse_scores, relative_scores,
                                run_judge)
from trainer.eval.multiple_choice import Problem, evaluate_multiple_choice, load_problems, parse_choice, prompt

# What the fake judge gives an answer: references score 8; a candidate's score depends on the question's category.
CANDIDATE_SCORE = {"conversation": 2, "detail": 4, "complex": 6}
BIAS = 1  # the fake judge also favours whichever answer it is shown first


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


class FakeJudge:
    """A responder for FakeOpenAI: writes references, and judges with a position bias and scripted unparsable replies."""

    def __init__(self, unparsable: dict | None = None):
        self.unparsable = dict(unparsable or {})  # question text -> how many bad judgements to give first
        self.judged = []

    def __call__(self, messages):
        system, user = messages[0]["content"], messages[-1]["content"]
        if system == REFERENCE_SYSTEM:
            return "REF " + user.split("Question: ", 1)[1]
        assert system == JUDGE_SYSTEM
        question = between(user, "[Question]", "[Assistant 1]")
        if self.unparsable.get(question, 0):
            self.unparsable[question] -= 1
            return "Both answers are fine, I would say."
        category = question.split()[0]
        first, second = between(user, "[Assistant 1]", "[End of Assistant 1]"), between(user, "[Assistant 2]", "[End of Assistant 2]")
        score = [8 if answer.startswith("REF") else CANDIDATE_SCORE[category] for answer in (first, second)]
        self.judged.append((question, first, second))
        return f"{score[0] + BIAS} {score[1]}\nAssistant 1 is more detailed."


@pytest.fixture
def questions_file(tmp_path):
    rows = [{"question_id": n, "image": f"img{n % 3}.png", "text": f"{category} question {n}?", "category": category}
            for n, category in enumerate(["conversation", "detail", "complex"] * 8)]
    path = tmp_path / "questions.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    (tmp_path / "context.jsonl").write_text("\n".join(json.dumps({"image": f"img{n}.png", "caption": f"a photo number {n}"})
                                                      for n in range(3)))
    return path


def judged_run(tmp_path, questions_file, server, **overrides):
    questions = load_questions(questions_file, tmp_path / "context.jsonl")
    settings = JudgeSettings(base_url=server.base_url, api_key="sk-test", progress_bar=False, timeout=2.0, **overrides)
    return run_judge(questions, lambda question: f"candidate says: {question.text}", tmp_path / "out", settings, "tiny")


def chat_requests(server):
    return [json.loads(request["raw"]) for request in server.requests if request["path"].endswith("/chat/completions")]


def test_relative_scores_come_from_the_judge_with_order_randomised_and_bias_cancelled(tmp_path, questions_file):
    judge = FakeJudge()
    with FakeOpenAI(responder=judge) as server:
        scores = judged_run(tmp_path, questions_file, server)
    reviews = [json.loads(line) for line in (tmp_path / "out" / "reviews.jsonl").read_text().splitlines()]
    orders = [review["order"] for review in reviews]
    assert 0 < orders.count("candidate first") < len(orders)  # both orders are used
    for review in reviews:  # scores are mapped back to reference and candidate whichever way they were shown
        first_bonus = BIAS if review["order"] == "candidate first" else 0
        assert review["candidate_score"] == CANDIDATE_SCORE[review["category"]] + first_bonus
        assert review["reference_score"] == 8 + (BIAS - first_bonus)
    for category, candidate in CANDIDATE_SCORE.items():
        chosen = [r for r in reviews if r["category"] == category]
        expected = sum(r["candidate_score"] for r in chosen) / sum(r["reference_score"] for r in chosen) * 100
        assert scores[category]["relative"] == pytest.approx(expected)
        assert scores[category]["candidate_mean"] == pytest.approx(sum(r["candidate_score"] for r in chosen) / len(chosen))
    overall = sum(r["candidate_score"] for r in reviews) / sum(r["reference_score"] for r in reviews) * 100
    assert scores["overall"]["relative"] == pytest.approx(overall)
    assert 45 < overall < 55  # 4 of 8 on average, the first-position bias mostly cancelled
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"| overall | {overall:.1f} |" in report
    references = [body for body in chat_requests(server) if body["messages"][0]["content"] == REFERENCE_SYSTEM]
    assert len(references) == 24  # text-only references were generated for the questions without one
    asked = {body["messages"][1]["content"] for body in references}
    assert "Image description:\na photo number 1\n\nQuestion: detail question 1?" in asked
    assert all(isinstance(m["content"], str) for body in references for m in body["messages"])  # no image goes out


def test_unparsable_judgements_are_retried_then_counted_not_guessed(tmp_path, questions_file):
    judge = FakeJudge(unparsable={"detail question 1?": 1, "complex question 2?": 99})
    with FakeOpenAI(responder=judge) as server:
        scores = judged_run(tmp_path, questions_file, server, parse_retries=2)
    reviews = {r["question_id"]: r for r in map(json.loads, (tmp_path / "out" / "reviews.jsonl").read_text().splitlines())}
    assert reviews["1"]["attempts"] == 2 and not reviews["1"].get("failed")
    assert reviews["2"]["failed"] and reviews["2"]["attempts"] == 3
    assert scores["complex"]["failed"] == 1 and scores["complex"]["scored"] == 7
    assert scores["overall"]["failed"] == 1 and scores["overall"]["scored"] == 23


def test_a_rerun_resumes_without_asking_again(tmp_path, questions_file):
    with FakeOpenAI(responder=FakeJudge()) as server:
        first = judged_run(tmp_path, questions_file, server)
    reviews = tmp_path / "out" / "reviews.jsonl"
    lines = reviews.read_text().splitlines()
    reviews.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])  # a crash mid-line, three judgements short
    with FakeOpenAI(responder=FakeJudge()) as server:
        second = judged_run(tmp_path, questions_file, server)
        assert len(chat_requests(server)) == 3  # references and answers were kept; only the lost judgements
    assert second["overall"]["scored"] == 24 and len(reviews.read_text().splitlines()) == 24
    assert {k: v["reference_mean"] for k, v in first.items()} == {k: v["reference_mean"] for k, v in second.items()}


def test_given_references_are_used_and_bad_question_files_name_the_line(tmp_path, questions_file):
    references = tmp_path / "answers_gpt4.jsonl"
    references.write_text("\n".join(json.dumps({"question_id": n, "text": f"REF given {n}"}) for n in range(24)))
    with FakeOpenAI(responder=FakeJudge()) as server:
        questions = load_questions(questions_file, tmp_path / "context.jsonl", references)
        settings = JudgeSettings(base_url=server.base_url, api_key="sk-test", progress_bar=False)
        run_judge(questions, lambda q: "hm", tmp_path / "out", settings, "tiny")
        assert all(body["messages"][0]["content"] == JUDGE_SYSTEM for body in chat_requests(server))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "text": "q", "category": "conversation", "context": "c"}) + "\n"
                   + json.dumps({"question_id": 2, "text": "q", "category": "chitchat", "context": "c"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: category 'chitchat'"):
        load_questions(bad)
    bad.write_text(json.dumps({"question_id": 1, "text": "q", "category": "detail"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no context"):
        load_questions(bad)


@pytest.mark.parametrize("line, expected", [("8 7", (8, 7)), ("**9 6**", (9, 6)), ("7.5, 8", (7.5, 8)), ("  10 1  ", (10, 1))])
def test_score_lines_parse(line, expected):
    assert parse_scores(line + "\nbecause...") == expected


@pytest.mark.parametrize("text", ["", "Assistant 1 is better.", "8\n7", "11 3", "0 5", "8 7 6"])
def test_bad_score_lines_are_refused(text):
    with pytest.raises(ValueError):
        parse_scores(text)


def test_relative_scores_with_every_judgement_failed_say_so():
    scores = relative_scores([{"category": "detail", "failed": True}])
    assert scores["detail"] == {"relative": None, "reference_mean": None, "candidate_mean": None, "scored": 0, "failed": 1}


OPTIONS = ["red", "green", "blue"]


@pytest.mark.parametrize("answer, expected", [
    ("The answer is B.", 1), ("the answer is (C)", 2), ("A", 0), ("(B) green", 1), ("C. blue", 2), ("blue", 2),
    ("Blue.", 2), ("The answer is D.", None), ("I am not sure.", None), ("An apple", None), ("", None)])
def test_choices_are_read_from_answers(answer, expected):
    assert parse_choice(answer, OPTIONS) == expected


def test_multiple_choice_accuracy_per_subject_from_what_the_model_said(tmp_path):
    problems = [Problem(f"p{n}", f"Which colour is {n}?", OPTIONS, n % 3, "", None, "colors" if n < 6 else "science")
                for n in range(9)]
    said = {"p0": "The answer is A.", "p1": "The answer is B.", "p2": "The answer is A.", "p3": "no idea",
            "p4": "B", "p5": "blue", "p6": "The answer is A.", "p7": "The answer is C.", "p8": "(C)"}
    prompts = []
    scores = evaluate_multiple_choice(problems, lambda p, text: prompts.append(text) or said[p.id], tmp_path / "a.jsonl",
                                      progress=False)
    assert scores["colors"] == {"accuracy": 4 / 6, "questions": 6, "unparsed": 1}
    assert scores["science"] == {"accuracy": 2 / 3, "questions": 3, "unparsed": 0}
    assert scores["overall"]["accuracy"] == 6 / 9
    assert prompts[0].startswith("Context: N/A\nQuestion: Which colour is 0?\nOptions: (A) red (B) green (C) blue")
    again = evaluate_multiple_choice(problems, lambda p, text: pytest.fail("answered twice"), tmp_path / "a.jsonl", progress=False)
    assert again == scores  # resumed from the answers file
    custom = prompt(problems[0], "Q: {question} {options}")
    assert custom == "Q: Which colour is 0? (A) red (B) green (C) blue"


def test_multiple_choice_inputs_jsonl_and_scienceqa(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"id": 1, "question": "q", "options": ["x", "y"], "answer": "B"}) + "\n"
                    + json.dumps({"id": 2, "question": "q", "options": ["x", "y"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=r"mc.jsonl:2: answer 5"):
        load_problems(path)
    scienceqa = tmp_path / "problems.json"
    scienceqa.write_text(json.dumps({
        "7": {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "hint": "Look closely.",
              "image": "image.png", "subject": "natural science", "split": "test"},
        "8": {"question": "q", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None, "subject": "language science",
              "split": "train"}}))
    (problem,) = load_problems(scienceqa, split="test")
    assert (problem.answer, problem.context, problem.image, problem.subject) == (1, "Look closely.", "test/7/image.png", "natural science")


def test_cli_runs_each_command_on_a_real_checkpoint(saved_checkpoint, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "img0.png")
    problems = tmp_path / "mc.jsonl"
    problems.write_text("\n".join(json.dumps({"id": n, "question": f"Pick {n}", "options": ["one", "two"], "answer": n % 2,
                                              "image": "img0.png" if n == 0 else None, "subject": "s"}) for n in range(3)))
    assert eval_main(["mc", "--model", str(saved_checkpoint), "--output", str(tmp_path / "mc"), "--problems", str(problems),
                      "--image-folder", str(tmp_path), "--max-new-tokens", "6", "--quiet"]) == 0
    answers = [json.loads(line) for line in (tmp_path / "mc" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 3
    right = sum(parse_choice(a["answer"], ["one", "two"]) == n % 2 for n, a in enumerate(answers))
    assert json.loads((tmp_path / "mc" / "scores.json").read_text())["overall"]["accuracy"] == right / 3
    assert "| overall |" in (tmp_path / "mc" / "report.md").read_text()

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": "a", "image": "img0.png", "text": "conversation about it?",
                                     "category": "conversation", "context": "a red picture"}) + "\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeOpenAI(responder=FakeJudge()) as server:
        code = eval_main(["judge", "--model", str(saved_checkpoint), "--output", str(tmp_path / "judge"), "--questions", str(questions),
                          "--image-folder", str(tmp_path), "--base-url", server.base_url, "--max-new-tokens", "6", "--quiet"])
    assert code == 0
    (review,) = [json.loads(line) for line in (tmp_path / "judge" / "reviews.jsonl").read_text().splitlines()]
    candidate_first = review["order"] == "candidate first"
    expected = 100 * (CANDIDATE_SCORE["conversation"] + BIAS * candidate_first) / (8 + BIAS * (not candidate_first))
    assert json.loads((tmp_path / "judge" / "scores.json").read_text())["overall"]["relative"] == pytest.approx(expected)
    assert f"| overall | {expected:.1f} |" in (tmp_path / "judge" / "report.md").read_text()

    assert eval_main(["shapes", "--model", str(saved_checkpoint), "--output", str(tmp_path / "shapes"), "--images", "2",
                      "--max-new-tokens", "4", "--quiet"]) == 0
    result = json.loads((tmp_path / "shapes" / "scores.json").read_text())
    answers = [json.loads(line) for line in (tmp_path / "shapes" / "answers.jsonl").read_text().splitlines()]
    assert result["counts"]["count"] == 2 and sum(result["counts"].values()) == len(answers)
    assert result["accuracy"]["count"] == sum(a["right"] for a in answers if a["kind"] == "count") / 2
    assert "llava-eval" not in capsys.readouterr().err  # no error was printed


def test_a_bad_key_stops_the_judge_with_a_clear_message(saved_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-revoked")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": "a", "text": "conversation?", "category": "conversation", "context": "c"}))
    with FakeOpenAI(script=["401"] * 20) as server:
        code = eval_main(["judge", "--model", str(saved_checkpoint), "--output", str(tmp_path / "out"), "--questions", str(questions),
                          "--base-url", server.base_url, "--quiet"])
        assert len(chat_requests(server)) == 1  # not retried: a bad key stays bad
    assert code == 2 and "Incorrect API key" in capsys.readouterr().err
