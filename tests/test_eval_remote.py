"""llava-eval --model-url: the candidate behind an OpenAI-compatible server (here the loopback fake), the image sent
as a data: URL and checked on arrival, the server's own key and never the judge's."""

import base64
import io
import json

from PIL import Image

from fake_openai import FakeOpenAI
from trainer.eval.cli import main as eval_main



class SeeingModel:
    """Decodes the image it receives and answers the option of its colour; records what it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, messages):
        (user,) = messages
        parts = {part["type"]: part for part in user["content"]}
        url = parts["image_url"]["image_url"]["url"]
        header, data = url.split(",", 1)
        assert header in ("data:image/png;base64", "data:image/jpeg;base64"), header
        image = Image.open(io.BytesIO(base64.b64decode(data)))
        red, _, blue = image.convert("RGB").getpixel((0, 0))
        self.seen.append((header, base64.b64decode(data), parts["text"]["text"]))
        return "A" if red > blue else "B"  # the option of the colour it was shown


def test_a_served_model_is_evaluated_with_the_image_sent_and_only_its_own_key(tmp_path, monkeypatch):
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (8, 6), (0, 0, 255)).save(tmp_path / "blue.jpg", quality=100)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    images = ["red.png", "blue.jpg", "broken.png"]
    problems = tmp_path / "mc.jsonl"
    problems.write_text("\n".join(json.dumps({"id": n, "question": f"Which colour {n}?", "options": ["red", "blue"],
                                              "answer": n % 2, "image": image}) for n, image in enumerate(images)))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-secret")
    monkeypatch.delenv("LLAVA_EVAL_MODEL_API_KEY", raising=False)
    model = SeeingModel()
    with FakeOpenAI(responder=model) as server:
        code = eval_main(["mc", "--model-url", server.base_url, "--api-key", "sk-model", "--output", str(tmp_path / "out"),
                          "--problems", str(problems), "--image-folder", str(tmp_path), "--prompt-format", "llava-1.5",
                          "--max-new-tokens", "7", "--quiet"])
        chats = [request for request in server.requests if request["path"].endswith("/chat/completions")]
    assert code == 0
    assert [(header, data) for header, data, _ in model.seen] == [  # each file's own bytes, in its own format
        ("data:image/png;base64", (tmp_path / "red.png").read_bytes()), ("data:image/jpeg;base64", (tmp_path / "blue.jpg").read_bytes())]
    assert model.seen[0][2].endswith("A. red\nB. blue\nAnswer with the option's letter from the given choices directly.")
    bodies = [json.loads(request["raw"]) for request in chats]
    assert all(b["model"] == "fake-llava" and b["temperature"] == 0 and b["max_tokens"] == 7 for b in bodies)
    assert all(request["headers"]["authorization"] == "Bearer sk-model" for request in chats)
    assert not any(b"sk-judge-secret" in request["raw"] or "sk-judge-secret" in json.dumps(request["headers"])
                   for request in server.requests)
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["overall"] == {"accuracy": 2 / 3, "questions": 3, "unparsed": 0, "failed": 1}
    assert "fake-llava at http://127.0.0.1" in (tmp_path / "out" / "report.md").read_text()


def test_without_a_key_the_judges_key_is_not_sent_and_a_named_model_is_used(tmp_path, monkeypatch):
    Image.new("RGB", (8, 6), (255, 0, 0)).save(tmp_path / "red.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "image": "red.png", "text": "What colour?", "category": "conv",
                                     "context": "a red square", "reference": "REF red"}) + "\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-judge-secret")
    monkeypatch.delenv("LLAVA_EVAL_MODEL_API_KEY", raising=False)
    model = SeeingModel()
    with FakeOpenAI(responder=model) as candidate_server, FakeOpenAI(responder=lambda m: "8 7\nfine") as judge_server:
        code = eval_main(["judge", "--model-url", candidate_server.base_url, "--model-name", "my-llava", "--output",
                          str(tmp_path / "out"), "--questions", str(questions), "--image-folder", str(tmp_path),
                          "--base-url", judge_server.base_url, "--quiet"])
        sent = [r for r in candidate_server.requests]
        judged = [r for r in judge_server.requests]
    assert code == 0 and len(model.seen) == 1
    assert [json.loads(r["raw"])["model"] for r in sent] == ["my-llava"]
    assert all(r["headers"]["authorization"] == "Bearer EMPTY" for r in sent)
    assert all(r["headers"]["authorization"] == "Bearer sk-judge-secret" for r in judged)
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["overall"]["relative"] == 87.5
