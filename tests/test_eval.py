"""llava-eval judge: LLaVA-Bench's files as released, the judge against the loopback OpenAI server (scores computed
from what the judge returns, summarised as the original's summarize_gpt_review.py does), the answer orders, the
original's rules file, and the CLI end to end on a tiny checkpoint. The rules and texts here are stand-ins written for
these tests, in the original's schemas."""

import json

import pytest
from PIL import Image

from fake_openai import FakeOpenAI
from trainer.eval.cli import main as eval_main
from trainer.eval.judge import REFERENCE_SYSTEM, JudgeSettings, load_questions, relative_scores, run_judge
from trainer.eval.multiple_choice import parse_choice
from trainer.eval.review import JUDGE_SYSTEM, Wording, load_rules, parse_scores

# What the fake judge gives an answer: references score 8; a candidate's score depends on the question's category.
CANDIDATE_SCORE = {"conv": 2, "detail": 4, "complex": 6}
BIAS = 1  # the fake judge also favours whichever answer it is shown first


def between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].strip()


class FakeJudge:
    """A responder for FakeOpenAI: writes references, and judges with a position bias and scripted unparsable replies."""

    def __init__(self, unparsable: dict | None = None, role: str = "Assistant", system: str = JUDGE_SYSTEM):
        self.unparsable = dict(unparsable or {})  # question text -> how many bad judgements to give first
        self.role, self.system = role, system
        self.judged = []

    def __call__(self, messages):
        system, user = messages[0]["content"], messages[-1]["content"]
        if system == REFERENCE_SYSTEM:
            return "REF " + user.split("Question: ", 1)[1]
        assert system == self.system
        question = between(user, "[Question]", f"[{self.role} 1]")
        if self.unparsable.get(question, 0):
            self.unparsable[question] -= 1
            return "Both answers are fine, I would say."
        category = question.split()[0]
        first = between(user, f"[{self.role} 1]", f"[End of {self.role} 1]")
        second = between(user, f"[{self.role} 2]", f"[End of {self.role} 2]")
        score = [8 if answer.startswith("REF") else CANDIDATE_SCORE[category] for answer in (first, second)]
        self.judged.append((question, first, second, user))
        return f"{score[0] + BIAS} {score[1]}\nAssistant 1 is more detailed."


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def questions_file(tmp_path):
    """qa90_questions.jsonl's schema: categories conv, detail, complex; context in an in-the-wild style file."""
    rows = [{"question_id": n, "image": f"img{n % 3}.png", "text": f"{category} question {n}?", "category": category}
            for n, category in enumerate(["conv", "detail", "complex"] * 8)]
    write_jsonl(tmp_path / "context.jsonl", [{"id": f"{n:03d}", "image": f"img{n}.png", "caption": f"a photo number {n}"}
                                             for n in range(3)])
    return write_jsonl(tmp_path / "questions.jsonl", rows)


def judged_run(tmp_path, questions_file, server, output="out", **overrides):
    questions = load_questions(questions_file, tmp_path / "context.jsonl")
    settings = JudgeSettings(base_url=server.base_url, api_key="sk-test", progress_bar=False, timeout=2.0, **overrides)
    return run_judge(questions, lambda question: f"candidate says: {question.text}", tmp_path / output, settings, "tiny")


def chat_requests(server):
    return [json.loads(request["raw"]) for request in server.requests if request["path"].endswith("/chat/completions")]


def read_reviews(folder):
    return [json.loads(line) for line in (folder / "reviews.jsonl").read_text().splitlines()]


def summarize_like_the_original(tuples_by_category: dict) -> dict:
    """summarize_gpt_review.py's arithmetic, written out: means of [Assistant 1, Assistant 2] rounded to 3
    decimals, then Assistant 2 / Assistant 1 x 100 rounded to 1."""
    out = {}
    for name, tuples in tuples_by_category.items():
        first, second = (round(sum(t[i] for t in tuples) / len(tuples), 3) for i in (0, 1))
        out[name] = round(second / first * 100, 1)
    return out


def test_released_llava_bench_files_are_read_unchanged(tmp_path):
    questions = write_jsonl(tmp_path / "qa90_questions.jsonl", [
        {"question_id": 0, "image": "000000441147.jpg", "text": "What is on the plate?", "category": "conv"},
        {"question_id": 1, "image": "000000441147.jpg", "text": "Describe the scene.", "category": "detail"},
        {"question_id": 2, "image": "000000296284.jpg", "text": "Why is it here?", "category": "complex"}])
    context = write_jsonl(tmp_path / "caps_boxes_coco2014_val_80.jsonl", [
        {"id": "000000441147", "image": "000000441147.jpg", "captions": ["A plate of food.", "Some donuts on a dish."],
         "instances": [{"category": "donut", "bbox": [0.37, 0.584, 0.504, 0.709]}, {"category": "dining table", "bbox": [0, 0.5, 1, 1.0]}]},
        {"id": "000000296284", "image": "000000296284.jpg", "captions": ["A dog."], "instances": []}])
    answers = write_jsonl(tmp_path / "qa90_gpt4_answer.jsonl", [
        {"question_id": n, "text": f"reference {n}", "category": c} for n, c in enumerate(["conv", "detail", "complex"])])
    first, second, third = load_questions(questions, context, answers)
    assert [q.category for q in (first, second, third)] == ["conv", "detail", "complex"]
    # captions one per line, a blank line, then the boxes as the original's review script prints them
    assert first.context == ("A plate of food.\nSome donuts on a dish.\n\n"
                             "donut: [0.37, 0.584, 0.504, 0.709]\ndining table: [0, 0.5, 1, 1.0]")
    assert third.context == "A dog.\n\n" and first.reference == "reference 0"
    wild = write_jsonl(tmp_path / "context.jsonl", [{"id": "001", "image": "001.jpg", "caption": "An aerial view of a crater."}])
    write_jsonl(questions, [{"question_id": 0, "image": "001.jpg", "text": "Where?", "category": "complex"}])
    (question,) = load_questions(questions, wild)
    assert question.context == "An aerial view of a crater." and question.context_kind == "caption"


def test_the_default_order_is_the_originals_and_scores_are_summarised_as_it_does(tmp_path, questions_file):
    judge = FakeJudge()
    with FakeOpenAI(responder=judge) as server:
        scores = judged_run(tmp_path, questions_file, server)
    reviews = read_reviews(tmp_path / "out")
    assert {review["order"] for review in reviews} == {"reference-first"}
    assert all(first.startswith("REF") for _, first, _, _ in judge.judged)  # the reference is always Assistant 1
    tuples = {}
    for review in reviews:  # the reference, shown first, gets the judge's bonus
        assert (review["reference_score"], review["candidate_score"]) == (8 + BIAS, CANDIDATE_SCORE[review["category"]])
        for name in (review["category"], "overall"):
            tuples.setdefault(name, []).append((review["reference_score"], review["candidate_score"]))
    assert {name: s["relative"] for name, s in scores.items()} == summarize_like_the_original(tuples)
    assert scores["overall"]["relative"] == 44.4 and scores["overall"]["reference_mean"] == 9.0
    assert scores["conv"]["candidate_mean"] == 2.0 and scores["complex"]["relative"] == 66.7
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| overall | 44.4 | 4.000 | 9.000 | 24 | 0 | 0 |" in report and "order reference-first" in report
    assert json.loads((tmp_path / "out" / "scores.json").read_text()) == scores
    references = [body for body in chat_requests(server) if body["messages"][0]["content"] == REFERENCE_SYSTEM]
    assert len(references) == 24  # text-only references were generated for the questions without one
    asked = {body["messages"][1]["content"] for body in references}
    assert "Image description:\na photo number 1\n\nQuestion: detail question 1?" in asked
    assert all(isinstance(m["content"], str) for body in references for m in body["messages"])  # no image goes out


def test_candidate_first_and_both_orders(tmp_path, questions_file):
    with FakeOpenAI(responder=FakeJudge()) as server:
        flipped = judged_run(tmp_path, questions_file, server, output="flipped", order="candidate-first")
    assert flipped["overall"]["relative"] == round(5 / 8 * 100, 1)  # now the candidate gets the bonus
    judge = FakeJudge()
    with FakeOpenAI(responder=judge) as server:
        both = judged_run(tmp_path, questions_file, server, output="both", order="both")
    assert len(judge.judged) == 48  # every question asked twice, once each way
    orders = [review["order"] for review in read_reviews(tmp_path / "both")]
    assert orders.count("reference-first") == orders.count("candidate-first") == 24
    # each side gets the bonus once: reference (9 + 8) / 2, candidate (4 + 5) / 2 on average
    assert (both["overall"]["reference_mean"], both["overall"]["candidate_mean"]) == (8.5, 4.5)
    assert both["overall"]["relative"] == 52.9 and both["conv"]["relative"] == round(2.5 / 8.5 * 100, 1)


def test_a_rules_file_is_composed_as_the_originals_review_script(tmp_path):
    rules = tmp_path / "rule.json"
    rules.write_text(json.dumps({
        "default": {"role": "Assistant", "prompt": "Unused default rule."},
        **{f"llava_bench_{c}": {"role": "Helper", "prompt": f"Stand-in wild rule for {c}."} for c in ("conv", "detail", "complex")},
        **{c: {"role": "Helper", "prompt": f"Stand-in COCO rule for {c}."} for c in ("conv", "detail", "complex")}}))
    write_jsonl(tmp_path / "caps.jsonl", [{"id": "1", "image": "1.jpg", "captions": ["A cat.", "A pet."],
                                           "instances": [{"category": "cat", "bbox": [0.1, 0.2, 0.3, 0.4]}]}])
    write_jsonl(tmp_path / "wild.jsonl", [{"id": "2", "image": "2.jpg", "caption": "A painting."}])
    write_jsonl(tmp_path / "coco_q.jsonl", [{"question_id": 5, "image": "1.jpg", "text": "detail what?", "category": "detail"}])
    write_jsonl(tmp_path / "wild_q.jsonl", [{"question_id": 6, "image": "2.jpg", "text": "conv who?", "category": "conv"}])
    questions = (load_questions(tmp_path / "coco_q.jsonl", tmp_path / "caps.jsonl")
                 + load_questions(tmp_path / "wild_q.jsonl", tmp_path / "wild.jsonl"))
    questions[0].reference, questions[1].reference = "REF coco", "REF wild"
    judge = FakeJudge(role="Helper", system="Stand-in system sentence.")
    with FakeOpenAI(responder=judge) as server:
        settings = JudgeSettings(base_url=server.base_url, api_key="sk-test", progress_bar=False,
                                 wording=Wording(load_rules(rules), "Stand-in system sentence."))
        scores = run_judge(questions, lambda q: "the candidate", tmp_path / "out", settings, "tiny")
        bodies = chat_requests(server)
    users = sorted(body["messages"][1]["content"] for body in bodies)
    assert users[0] == ("[Context]\nA cat.\nA pet.\n\ncat: [0.1, 0.2, 0.3, 0.4]\n\n[Question]\ndetail what?\n\n"
                        "[Helper 1]\nREF coco\n\n[End of Helper 1]\n\n[Helper 2]\nthe candidate\n\n[End of Helper 2]\n\n"
                        "[System]\nStand-in COCO rule for detail.\n\n")
    assert users[1] == ("[Context]\nA painting.\n\n[Question]\nconv who?\n\n[Helper 1]\nREF wild\n\n[End of Helper 1]\n\n"
                        "[Helper 2]\nthe candidate\n\n[End of Helper 2]\n\n[System]\nStand-in wild rule for conv.\n\n")
    assert all(body["temperature"] == 0.2 and body["max_tokens"] == 1024 for body in bodies)
    assert scores["detail"]["relative"] == round(4 / 9 * 100, 1) and scores["conv"]["relative"] == round(2 / 9 * 100, 1)
    rules.write_text(json.dumps({"llava_bench_conv": {"role": "Assistant", "prompt": "p"}}))
    with pytest.raises(ValueError, match="no rule for llava_bench_detail, llava_bench_complex"):
        load_rules(rules)


def test_unparsable_judgements_are_retried_then_counted_not_guessed(tmp_path, questions_file):
    judge = FakeJudge(unparsable={"detail question 1?": 1, "complex question 2?": 99})
    with FakeOpenAI(responder=judge) as server:
        scores = judged_run(tmp_path, questions_file, server, parse_retries=2)
    reviews = {r["question_id"]: r for r in read_reviews(tmp_path / "out")}
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
    assert first == second
    with FakeOpenAI(responder=FakeJudge()) as server:  # `both` reuses the reference-first judgements
        judged_run(tmp_path, questions_file, server, order="both")
        assert len(chat_requests(server)) == 24


def test_an_unreadable_image_leaves_that_question_unanswered_and_the_run_goes_on(tmp_path, questions_file):
    def answer(question):
        if question.image == "img1.png" and not (tmp_path / "fixed").exists():
            from llava_plugin import ImageLoadError
            raise ImageLoadError("cannot read image img1.png: truncated")
        return "fine"

    questions = load_questions(questions_file, tmp_path / "context.jsonl")
    with FakeOpenAI(responder=FakeJudge()) as server:
        settings = JudgeSettings(base_url=server.base_url, api_key="sk-test", progress_bar=False)
        scores = run_judge(questions, answer, tmp_path / "out", settings, "tiny")
        assert scores["overall"]["unanswered"] == 8 and scores["overall"]["scored"] == 16
        assert "| overall |" in (tmp_path / "out" / "report.md").read_text()
        again = run_judge(questions, answer, tmp_path / "out", settings, "tiny")  # a rerun does not stop there either
        assert again == scores
        (tmp_path / "fixed").touch()
        fixed = run_judge(questions, answer, tmp_path / "out", settings, "tiny")  # and answers it once it can
    assert fixed["overall"]["unanswered"] == 0 and fixed["overall"]["scored"] == 24


def test_given_references_are_used_and_bad_question_files_name_the_line(tmp_path, questions_file):
    references = write_jsonl(tmp_path / "answers_gpt4.jsonl", [{"question_id": n, "text": f"REF given {n}"} for n in range(24)])
    with FakeOpenAI(responder=FakeJudge()) as server:
        questions = load_questions(questions_file, tmp_path / "context.jsonl", references)
        settings = JudgeSettings(base_url=server.base_url, api_key="sk-test", progress_bar=False)
        run_judge(questions, lambda q: "hm", tmp_path / "out", settings, "tiny")
        assert all(body["messages"][0]["content"] == JUDGE_SYSTEM for body in chat_requests(server))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "text": "q", "category": "conv", "context": "c"},
                                               {"question_id": 2, "text": "q", "category": "chitchat", "context": "c"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: category 'chitchat'"):
        load_questions(bad)
    write_jsonl(bad, [{"question_id": 1, "text": "q", "category": "detail"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no context"):
        load_questions(bad)
    write_jsonl(bad, [{"id": "1", "image": "1.jpg", "captions": ["c"], "instances": [{"category": "cat", "bbox": [1, 2]}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1: instances\[0\] must be"):
        load_questions(questions_file, bad)


@pytest.mark.parametrize("line, expected", [("8 7", (8, 7)), ("**9 6**", (9, 6)), ("7.5, 8", (7.5, 8)), ("  10 1  ", (10, 1))])
def test_score_lines_parse(line, expected):
    assert parse_scores(line + "\nbecause...") == expected


@pytest.mark.parametrize("text", ["", "Assistant 1 is better.", "8\n7", "11 3", "0 5", "8 7 6"])
def test_bad_score_lines_are_refused(text):
    with pytest.raises(ValueError):
        parse_scores(text)


def test_relative_scores_with_every_judgement_failed_say_so():
    scores = relative_scores([{"category": "detail", "failed": True}])
    assert scores["detail"] == {"relative": None, "reference_mean": None, "candidate_mean": None, "scored": 0, "failed": 1,
                                "unanswered": 0}


def test_cli_runs_each_command_on_a_real_checkpoint(saved_checkpoint, tmp_path, capsys, monkeypatch):
    Image.new("RGB", (40, 30), "red").save(tmp_path / "img0.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # an unreadable image: counted, not fatal
    problems = tmp_path / "mc.jsonl"
    images = {0: "img0.png", 3: "broken.png"}
    problems.write_text("\n".join(json.dumps({"id": n, "question": f"Pick {n}", "options": ["one", "two"], "answer": n % 2,
                                              "image": images.get(n), "subject": "s"}) for n in range(4)))
    command = ["mc", "--model", str(saved_checkpoint), "--output", str(tmp_path / "mc"), "--problems", str(problems),
               "--image-folder", str(tmp_path), "--max-new-tokens", "6", "--quiet", "--lenient"]
    assert eval_main(command) == 0
    answers = {a["id"]: a for a in map(json.loads, (tmp_path / "mc" / "answers.jsonl").read_text().splitlines())}
    assert len(answers) == 4 and answers["3"]["failed"] and "broken.png" in answers["3"]["error"]
    right = sum(parse_choice(answers[str(n)]["answer"], ["one", "two"]) == n % 2 for n in range(3))
    scores = json.loads((tmp_path / "mc" / "scores.json").read_text())
    assert scores["overall"] == {"accuracy": right / 4, "questions": 4, "unparsed": scores["overall"]["unparsed"], "failed": 1}
    assert "| overall |" in (tmp_path / "mc" / "report.md").read_text()
    assert eval_main(command) == 0  # a rerun tries the broken image again and goes on
    assert len((tmp_path / "mc" / "answers.jsonl").read_text().splitlines()) == 5

    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": "a", "image": "img0.png", "text": "conv about it?",
                                     "category": "conversation", "context": "a red picture"}) + "\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with FakeOpenAI(responder=FakeJudge()) as server:
        code = eval_main(["judge", "--model", str(saved_checkpoint), "--output", str(tmp_path / "judge"), "--questions", str(questions),
                          "--image-folder", str(tmp_path), "--base-url", server.base_url, "--max-new-tokens", "6", "--quiet"])
    assert code == 0
    (review,) = [json.loads(line) for line in (tmp_path / "judge" / "reviews.jsonl").read_text().splitlines()]
    assert review["order"] == "reference-first"
    expected = round(100 * CANDIDATE_SCORE["conv"] / (8 + BIAS), 1)
    assert json.loads((tmp_path / "judge" / "scores.json").read_text())["overall"]["relative"] == expected
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


def test_an_unreadable_shapes_image_counts_its_questions_failed_and_the_run_goes_on(tmp_path):
    from llava_plugin import load_image
    from trainer.eval.shapes import evaluate_shapes, load_split, shapes_report
    from trainer.shapes.world import write_split

    class Looking:  # a candidate that opens the image as the real one does, and always says "red"
        def answer(self, question, image, max_new_tokens=None):
            return self.answer_many([question], image)[0]

        def answer_many(self, questions, image, max_new_tokens=None, history=()):
            load_image(image)
            return ["red"] * len(questions)

    split = write_split(tmp_path / "world", "test", 3, 0)
    records = load_split(split)
    (split.parent / "images" / records[1]["image"]).write_bytes(b"truncated")
    result = evaluate_shapes(Looking(), records, split.parent / "images", tmp_path / "answers.jsonl", progress=False,
                             opener="How many shapes?")
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    per_image = sum(answer["image"] == records[1]["image"] for answer in answers)
    assert per_image > 0 and result["failed"] == per_image and all(a.get("failed") for a in answers if a["image"] == records[1]["image"])
    assert result["failed"] < len(answers) and "could not be read" in shapes_report(result, "tiny")
    again = evaluate_shapes(Looking(), records, split.parent / "images", tmp_path / "answers.jsonl", progress=False,
                            opener="How many shapes?")
    assert again["failed"] == per_image  # a rerun tries it again and does not stop there either
