"""The app end to end: a real server on loopback, driven through gradio_client as a user's script would."""

import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app import conversation_from
from app_process import running_app

def test_conversation_keeps_the_image_in_the_first_user_turn():
    history = [
        {"role": "user", "content": [{"path": "/tmp/cat.png"}]},
        {"role": "user", "content": "What is it?"},
        {"role": "assistant", "content": "A cat."},
    ]
    messages, image = conversation_from({"text": "What colour?", "files": []}, history)
    assert image == "/tmp/cat.png"
    assert messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "What colour?"},
    ]


def test_a_new_image_starts_a_new_conversation_and_notices_stay_out_of_the_prompt():
    history = [
        {"role": "user", "content": [{"path": "/tmp/a.png"}, "What is it?"]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"file": {"path": "/tmp/b.png"}}]},  # the browser's form: file, then text
        {"role": "user", "content": [{"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "x" * 10},
        {"role": "assistant", "content": "Sorry, I could not use that input: the conversation is too long"},
    ]
    messages, image = conversation_from({"text": "What colour?", "files": []}, history)
    assert image == "/tmp/b.png"
    assert messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "What colour?"},
    ]
    assert conversation_from({"text": "Hi", "files": []}, []) == ([], None)  # after Clear: nothing of before


@pytest.fixture(scope="module")
def server(saved_checkpoint, tmp_path_factory):
    with running_app(["--model", str(saved_checkpoint)], tmp_path_factory.mktemp("app") / "app.log") as (url, _):
        yield url


def test_chat_answers_a_question_about_an_image(server, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (255, 0, 0)).save(image)
    client = Client(server, verbose=False)
    first = client.predict({"text": "What is in the picture?", "files": [handle_file(str(image))]}, 0.0, 0.7, 8, api_name="/chat")
    assert isinstance(first, str) and first and not first.startswith(("Please", "Sorry"))


def direct_answer(saved_checkpoint, turns, image, max_new_tokens=8):
    """What the engine answers for the whole conversation at once, without any cache (greedy)."""
    from engine import ChatEngine

    engine = direct_answer.engine = getattr(direct_answer, "engine", None) or ChatEngine(str(saved_checkpoint), device="cpu")
    return list(engine.stream(turns, image, temperature=0.0, max_new_tokens=max_new_tokens))[-1]


def test_two_turns_through_the_api_continue_one_conversation(server, saved_checkpoint, tmp_path):
    picture = tmp_path / "blue.png"
    Image.new("RGB", (64, 48), (0, 0, 255)).save(picture)
    client = Client(server, verbose=False)
    first = client.predict({"text": "What is it?", "files": [handle_file(str(picture))]}, 0.0, 0.7, 8, api_name="/chat")
    second = client.predict({"text": "Are you sure?", "files": []}, 0.0, 0.7, 8, api_name="/chat")
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
             {"role": "assistant", "content": first}, {"role": "user", "content": "Are you sure?"}]
    image = Image.open(picture).convert("RGB")
    assert first == direct_answer(saved_checkpoint, turns[:1], image)
    assert second == direct_answer(saved_checkpoint, turns, image)  # the second turn saw the first
    other = Client(server, verbose=False).predict({"text": "Are you sure?", "files": []}, 0.0, 0.7, 8, api_name="/chat")
    assert other == "Please attach an image to your first message."  # another client has no conversation yet


def test_a_follow_up_after_a_new_image_is_about_the_new_image(server, saved_checkpoint, tmp_path):
    first, second = tmp_path / "first.png", tmp_path / "second.png"
    Image.new("RGB", (64, 48), (250, 10, 10)).save(first)
    Image.new("RGB", (30, 70), (10, 10, 250)).save(second)
    client = Client(server, verbose=False)
    answer_a = client.predict({"text": "What is it?", "files": [handle_file(str(first))]}, 0.0, 0.7, 16, api_name="/chat")
    answer_b = client.predict({"text": "And now?", "files": [handle_file(str(second))]}, 0.0, 0.7, 16, api_name="/chat")
    follow_up = client.predict({"text": "Are you sure?", "files": []}, 0.0, 0.7, 16, api_name="/chat")
    about_b = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And now?"}]},
               {"role": "assistant", "content": answer_b}, {"role": "user", "content": "Are you sure?"}]
    # What the app asked before (f14f242): both conversations merged, about the first image.
    merged = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
              {"role": "assistant", "content": answer_a}, {"role": "user", "content": "And now?"},
              {"role": "assistant", "content": answer_b}, {"role": "user", "content": "Are you sure?"}]
    expected = direct_answer(saved_checkpoint, about_b, Image.open(second).convert("RGB"), 16)
    assert expected != direct_answer(saved_checkpoint, merged, Image.open(first).convert("RGB"), 16)  # the test can tell
    assert follow_up == expected


def test_a_typed_image_marker_is_text(server, saved_checkpoint, tmp_path):
    picture = tmp_path / "green.png"
    Image.new("RGB", (40, 40), (0, 200, 0)).save(picture)
    client = Client(server, verbose=False)
    first = client.predict({"text": "Is <image> or </s> here?", "files": [handle_file(str(picture))]}, 0.0, 0.7, 8,
                           api_name="/chat")
    second = client.predict({"text": "And <image>?", "files": []}, 0.0, 0.7, 8, api_name="/chat")
    assert not first.startswith(("Sorry", "Please")) and not second.startswith(("Sorry", "Please")), (first, second)


def test_eight_concurrent_clients_get_their_own_answers(server, saved_checkpoint, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    pictures = []
    for index in range(8):
        path = tmp_path / f"{index}.png"
        colour = ((index * 97) % 256, (index * 53 + 128) % 256, (255 - index * 31) % 256)
        Image.new("RGB", (40 + index * 9, 40), colour).save(path)
        pictures.append(path)

    def ask(path):
        return Client(server, verbose=False).predict({"text": "Describe it.", "files": [handle_file(str(path))]}, 0.0, 0.7, 8, api_name="/chat")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, pictures))
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    assert answers == [direct_answer(saved_checkpoint, turn, Image.open(path).convert("RGB")) for path in pictures]
    assert len(set(answers)) > 1, answers  # different images, different answers: a mix-up would show


def test_first_message_without_an_image_is_asked_for_one(server):
    answer = Client(server, verbose=False).predict({"text": "Hello?", "files": []}, 0.0, 0.7, 8, api_name="/chat")
    assert answer == "Please attach an image to your first message."


def test_a_file_that_is_not_an_image_gets_a_clear_message(server, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("just text")
    answer = Client(server, verbose=False).predict(
        {"text": "What is this?", "files": [handle_file(str(bogus))]}, 0.0, 0.7, 8, api_name="/chat"
    )
    assert answer.startswith("Sorry, I could not use that input: cannot read image") and "notes.png" in answer


def test_data_tab_drafts_shows_boxes_and_offers_a_download(tmp_path):
    import json as json_module

    from app import DraftPolicy, make_draft

    picture = tmp_path / "white.png"
    Image.new("RGB", (336, 336), "white").save(picture)
    boxed, chat, text, path = make_draft(DraftPolicy())("", "A red circle.", "red circle: [20, 20, 120, 120]", str(picture),
                                                        None, None, ["conversation", "detail"], "offline", "", "", "gpt-4.1", 0)
    assert boxed.getpixel((20, 70)) == (255, 0, 255) and Image.open(picture).getpixel((20, 70)) == (255, 255, 255)
    records = json_module.loads(open(path).read())
    assert [record["id"] for record in records] == ["pasted_conversation", "pasted_detail"]
    assert json_module.loads(text) == records and chat[0]["content"] == "**pasted_conversation**"


def test_data_tab_reports_bad_boxes_clearly():
    import gradio

    from app import DraftPolicy, make_draft

    with pytest.raises(gradio.Error, match="box line 1 should read"):
        make_draft(DraftPolicy())("", "A cat.", "cat: [1, 2]", None, 100, 100, ["detail"], "offline", "", "", "gpt-4.1", 0)


def test_data_tab_through_the_api(server):
    boxed, chat, text, path = Client(server, verbose=False).predict(
        "", "Two shapes.", "blue square: [10, 10, 50, 50]", None, 100, 100, ["complex"], "offline", "", "", "gpt-4.1", 3,
        api_name="/draft")
    assert '"id": "pasted_complex"' in text and path.endswith("instruct.json")


@pytest.mark.timeout(300)
def test_without_arguments_the_app_answers_its_examples_with_the_embedded_model(tmp_path):
    """The quickstart path: `python app.py`, no --model, answers each example question with the embedded model, in
    the form its question asks for. (Whether the answers are right is the shapes model's own test,
    tests/test_shapes_model.py; its scores are in docs/shapes/report.md.)"""
    from app import EXAMPLES
    from trainer.shapes.world import COLORS, GRID, SHAPES, judge

    kinds = {"What color is the circle?": ("color", COLORS), "How many shapes are in the image?": ("count", [1, 2, 3]),
             "Where is the yellow triangle?": ("position", GRID),
             "Describe the image.": ("describe", [[f"{c} {s}"] for c in COLORS for s in SHAPES]),
             "Is there a blue square in the image?": ("yes/no", ["yes", "no"])}
    with running_app([], tmp_path / "app.log") as (url, _):
        client = Client(url, verbose=False)
        for example in EXAMPLES:
            answer = client.predict({"text": example["text"], "files": [handle_file(example["files"][0])]}, 0.0, 0.7, 64,
                                    api_name="/chat")
            kind, values = kinds[example["text"]]
            assert any(judge(kind, answer, value) for value in values), (example["text"], answer)


def test_a_wrong_model_path_exits_with_one_clear_line(tmp_path):
    for model, says in ((tmp_path / "no-such-checkpoint", "no such folder"), ("checkpoints/typo", "no such folder")):
        result = subprocess.run([sys.executable, "app.py", "--model", str(model)], cwd=Path(__file__).parent.parent,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and says in result.stderr and "Traceback" not in result.stderr, result.stderr[-800:]


def test_the_address_comes_from_gradios_environment_variables_unless_a_flag_says_otherwise(monkeypatch):
    from app import parse_args

    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert (parse_args([]).host, parse_args([]).port) == ("0.0.0.0", 7999)
    assert (parse_args(["--host", "127.0.0.1", "--port", "8001"]).host, parse_args(["--port", "8001"]).port) == ("127.0.0.1", 8001)


def test_running_with_a_model_loads_only_that_model(saved_checkpoint):
    """`python app.py --model X` builds one engine, on X (importing app.py used to load the default first)."""
    script = f"""
import runpy, sys
import gradio, engine
loaded = []
class Counting(engine.ChatEngine):
    def __init__(self, path, *args, **kwargs):
        loaded.append(path)
        super().__init__(path, *args, **kwargs)
engine.ChatEngine = Counting
gradio.Blocks.launch = lambda *args, **kwargs: None
sys.argv = ["app.py", "--model", {str(saved_checkpoint)!r}]
runpy.run_path("app.py", run_name="__main__")
print("LOADED", loaded)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                            timeout=180)
    assert f"LOADED [{str(saved_checkpoint)!r}]" in result.stdout, result.stderr[-1500:]


def test_the_embedded_models_defaults_are_the_best_measured_setting_and_the_measurement_runs(tmp_path):
    """The follow-up measurement (bench/followups_by_turn.py) runs, and the app's defaults for the embedded model are
    the setting it found best (docs/shapes/followups_by_turn.json, the numbers in the model card)."""
    import json
    import runpy

    from app import EMBEDDED_MODEL, EMBEDDED_MODEL_DEFAULTS, page_for, parse_args

    root = Path(__file__).resolve().parent.parent
    measured = json.loads((root / "docs" / "shapes" / "followups_by_turn.json").read_text())
    assert (EMBEDDED_MODEL_DEFAULTS["temperature"], EMBEDDED_MODEL_DEFAULTS["top_p"]) == tuple(measured["settings"][measured["best"]])
    assert page_for(parse_args(["--model", EMBEDDED_MODEL]))["defaults"] == EMBEDDED_MODEL_DEFAULTS
    assert f"{100 * measured['mean_followups'][measured['best']]:.1f}%" in (root / "checkpoints" / "shapes-llava" / "README.md").read_text()
    bench = runpy.run_path(str(root / "bench" / "followups_by_turn.py"), run_name="bench")
    assert bench["main"](["--scenes", "2", "--turns", "3", "--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert all(len(values) == 3 and all(0 <= value <= 1 for value in values) for values in result["by_turn"].values())


def test_remote_drafting_is_off_by_default_and_a_spaces_variables_can_turn_it_on(monkeypatch):
    from app import parse_args, policy_from

    assert policy_from(parse_args([])).remote is False
    monkeypatch.setenv("LLAVA_REMOTE_DRAFTING", "1")
    monkeypatch.setenv("LLAVA_DRAFT_BASE_URLS", "http://127.0.0.1:8000/v1,https://api.openai.com/v1")
    policy = policy_from(parse_args([]))
    assert policy.remote and policy.base_urls == ["http://127.0.0.1:8000/v1", "https://api.openai.com/v1"]
    assert policy.operator_key is None  # the operator's key only with --draft-with-operator-key


def test_the_app_is_a_front_end_for_an_openai_compatible_server(saved_checkpoint, tmp_path):
    """`python app.py --backend-url URL`: the chat answers through llava-serve (here on loopback) as it would itself,
    follow-ups included, and the app loads no model of its own."""
    from engine import ChatEngine
    from engine.server import create_app, running

    picture = tmp_path / "teal.png"
    Image.new("RGB", (50, 40), (0, 128, 128)).save(picture)
    engine = ChatEngine(str(saved_checkpoint), device="cpu")
    with running(create_app(engine, "tiny")) as base_url:
        with running_app(["--backend-url", base_url, "--backend-model", "tiny"], tmp_path / "front.log") as (url, _):
            client = Client(url, verbose=False)
            first = client.predict({"text": "What is it?", "files": [handle_file(str(picture))]}, 0.0, 0.7, 8, api_name="/chat")
            second = client.predict({"text": "Are you sure?", "files": []}, 0.0, 0.7, 8, api_name="/chat")
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    image = Image.open(picture).convert("RGB")
    assert first == direct_answer(saved_checkpoint, turns, image)
    turns += [{"role": "assistant", "content": first}, {"role": "user", "content": "Are you sure?"}]
    assert second == direct_answer(saved_checkpoint, turns, image)
    assert "Loading weights" not in (tmp_path / "front.log").read_text()


def test_the_data_tab_previews_a_large_picture_reduced_with_its_boxes_where_they_belong(tmp_path):
    from app import PREVIEW_SIDE, DraftPolicy, make_draft

    picture = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000), "white").save(picture)
    boxed, _, text, _ = make_draft(DraftPolicy())("", "A square.", "square: [1500, 1000, 2400, 1800]", str(picture), None,
                                                   None, ["detail"], "offline", "", "", "gpt-4.1", 0)
    assert boxed.size == (PREVIEW_SIDE, round(PREVIEW_SIDE * 2 / 3))  # decoded no larger than the preview
    assert boxed.getpixel((512, 400)) == (255, 0, 255)  # the box's left edge, scaled from 3000 px wide to 1024
    assert '"id": "pasted_detail"' in text


def test_with_multi_image_a_new_image_joins_the_conversation():
    history = [
        {"role": "user", "content": [{"path": "/tmp/a.png"}, "What is it?"]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"file": {"path": "/tmp/b.png"}}]},
        {"role": "user", "content": "And this?"},
        {"role": "assistant", "content": "A dog."},
    ]
    messages, images = conversation_from({"text": "Which is bigger?", "files": []}, history, keep_images=True)
    assert images == ["/tmp/a.png", "/tmp/b.png"]
    assert messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A dog."},
        {"role": "user", "content": "Which is bigger?"},
    ]


def test_a_multi_image_app_answers_about_both_images(saved_checkpoint, tmp_path):
    first, second = tmp_path / "one.png", tmp_path / "two.png"
    Image.new("RGB", (40, 40), (250, 0, 0)).save(first)
    Image.new("RGB", (30, 50), (0, 0, 250)).save(second)
    with running_app(["--model", str(saved_checkpoint), "--multi-image"], tmp_path / "multi.log") as (url, _):
        client = Client(url, verbose=False)
        answer_one = client.predict({"text": "What is it?", "files": [handle_file(str(first))]}, 0.0, 0.7, 16, api_name="/chat")
        answer_two = client.predict({"text": "And this?", "files": [handle_file(str(second))]}, 0.0, 0.7, 16, api_name="/chat")
    from engine import ChatEngine

    engine = ChatEngine(str(saved_checkpoint), device="cpu")
    both = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": answer_one},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    pictures = [Image.open(first).convert("RGB"), Image.open(second).convert("RGB")]
    assert answer_two == list(engine.stream(both, pictures, temperature=0.0, max_new_tokens=16))[-1]
    alone = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    assert answer_two != list(engine.stream(alone, pictures[1], temperature=0.0, max_new_tokens=16))[-1]  # can tell


def test_an_answer_the_model_breaks_off_keeps_its_text_and_says_why():
    """NonFiniteScores mid-answer (a float16 model overflowing): the chat keeps what was answered and adds why it
    stopped, instead of Gradio's bare "Error" in place of the whole answer."""
    from app import respond_with
    from engine import NonFiniteScores

    class Breaking:
        def stream(self, *args, **kwargs):
            yield "A red"
            yield "A red circle"
            raise NonFiniteScores("the model's next-token scores for this answer were NaN or infinite after 3 tokens")

    respond = respond_with(Breaking())
    said = list(respond({"text": "What is it?", "files": ["/tmp/x.png"]}, [], 0.2, 0.7, 64))
    assert said[:2] == ["A red", "A red circle"]
    assert said[-1].startswith("A red circle\n\n(") and "NaN or infinite" in said[-1]
