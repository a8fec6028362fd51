"""The Gradio app: multi-turn image chat and a data-drafting tab. Thin: it wires the UI to `engine` (and, for the
Data tab, to `trainer.datagen`'s drafting API).

python app.py [--model PATH_OR_ID | --backend-url URL] [--host H] [--port N] [--share] [--remote-drafting ...]

Everything a visitor sends is hostile: images are measured from their header (engine.untrusted), questions are
capped before tokenizing, the prompt holds only the conversation on screen, and the Data tab sends requests only
where the operator allowed, with the key the visitor typed (never the operator's, unless the operator says so).
"""

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, field

import gradio as gr
import openai

from engine import ChatEngine, ChatError, NonFiniteScores
from engine.untrusted import MAX_QUESTION_CHARS, UntrustedInputError, check_text, image_size, open_image
from trainer.datagen import KINDS, AnnotationError, draft_records
from trainer.datagen.openai_backend import DEFAULT_MODEL as DEFAULT_DRAFT_MODEL
from trainer.datagen.preview import annotation_from_text, as_chat, draw_boxes

MAX_UPLOAD = "25mb"  # larger uploads are refused by Gradio with a message
# Gradio keeps every upload (of any type: the file filter is the browser's) and every output in its cache: files
# older than an hour go, checked every hour, so the disk a visitor can fill is bounded.
DELETE_CACHE = (3600, 3600)
PREVIEW_SIDE = 1024  # the Data tab's picture with its boxes
MAX_DRAFT_FIELD_CHARS = 100_000  # a pasted record, captions or boxes: far more than any image's annotation
HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES_FOLDER = os.path.join(HERE, "examples")
EXAMPLES = [
    {"text": "What color is the circle?", "files": [os.path.join(EXAMPLES_FOLDER, "red_circle_blue_square.png")]},
    {"text": "How many shapes are in the image?", "files": [os.path.join(EXAMPLES_FOLDER, "three_shapes.png")]},
    {"text": "Where is the yellow triangle?", "files": [os.path.join(EXAMPLES_FOLDER, "yellow_triangle.png")]},
    {"text": "Describe the image.", "files": [os.path.join(EXAMPLES_FOLDER, "three_shapes.png")]},
    {"text": "Is there a blue square in the image?", "files": [os.path.join(EXAMPLES_FOLDER, "red_circle_blue_square.png")]},
]
# What the examples show (tests/test_app.py checks that the embedded model says so): red circle at the top left and
# blue square at the bottom right; green triangle at the top, yellow circle in the center, red square at the bottom
# left; one yellow triangle in the center.

# The embedded default: a miniature LLaVA trained on the shapes world (`llava-shapes`), committed with the code.
EMBEDDED_MODEL = os.path.join(HERE, "checkpoints", "shapes-llava")
DEFAULT_MODEL = os.environ.get("LLAVA_MODEL", EMBEDDED_MODEL)
EMBEDDED_MODEL_NOTE = (
    "The demo model is a miniature LLaVA trained only on the *shapes world*: red, green, blue and yellow circles, "
    "squares and triangles on a plain background. It answers what colour, which shape, how many, where, yes/no and "
    "\"describe\" questions about such images; about photos it has nothing sensible to say. Try an example below.")
GENERATION_DEFAULTS = {"temperature": 0.2, "top_p": 0.7, "max_new_tokens": 512}  # LLaVA's demo settings
# The embedded model answers greedily: bench/followups_by_turn.py (150 held-out scenes, turns 1-6 in one chat) gave
# 84.3% over turns 2-6 greedy, 84.0% at LLaVA's 0.2/0.7 and 81.2% at 0.7/0.9 (its model card has the table); greedy
# is also repeatable. Its answers are short.
EMBEDDED_MODEL_DEFAULTS = {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 64}

# The app's own replies (not the model's): they and the question they answer are left out of the next prompt.
ASK_FOR_IMAGE = "Please attach an image to your first message."
ASK_FOR_QUESTION = "Please type a question about the image."
REFUSAL = "Sorry, I could not use that input: "
NOTICES = (ASK_FOR_IMAGE, ASK_FOR_QUESTION, REFUSAL)


def _parts(content) -> tuple[list[str], list[str]]:
    """Gradio message content (a string, a file dict, or a list of them, in the API's or the browser's form) ->
    (texts, file paths)."""
    texts, files = [], []
    for part in content if isinstance(content, (list, tuple)) else [content]:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            path = part.get("path") or (part.get("file") or {}).get("path")
            if path:
                files.append(path)
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
    return texts, files


def conversation_from(message: dict, history: list[dict], keep_images: bool = False) -> tuple[list[dict], object]:
    """Gradio's history + the new message -> (chat-template messages of the current conversation, its image path;
    with `keep_images`, the list of its images' paths).

    The current conversation starts at the newest user message that brought an image (a new image starts a new
    conversation, as in LLaVA): what came before it is not in the prompt. With `keep_images` (a model trained on
    several images per conversation) it starts at the first one instead, and every image stays where it was sent.
    The app's own notices, and the question each one answered, are left out."""
    files = [{"path": file} if isinstance(file, str) else file for file in message.get("files") or []]
    new = {"role": "user", "content": [*files, message.get("text") or ""]}
    items = [(item.get("role"), *_parts(item.get("content"))) for item in [*history, new]]
    starts = [index for index, (role, _, files) in enumerate(items) if role == "user" and files]
    if not starts:
        return [], None
    items = items[starts[0] if keep_images else starts[-1]:]
    images = [path for role, _, paths in items if role == "user" for path in paths] if keep_images else [items[0][2][-1]]
    turns: list[dict] = []
    for index, (role, texts, paths) in enumerate(items):
        text = "\n".join(text for text in texts if text.strip())
        answered_by_notice = role == "user" and index + 1 < len(items) and items[index + 1][0] == "assistant" and \
            "\n".join(items[index + 1][1]).startswith(NOTICES)
        if answered_by_notice or text.startswith(NOTICES):
            text = ""
        brought = (len(paths) if keep_images else int(index == 0)) if role == "user" else 0
        if role not in ("user", "assistant") or not (text or brought):
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["text"] = "\n".join(part for part in (turns[-1]["text"], text) if part)
            turns[-1]["images"] += brought
        else:
            turns.append({"role": role, "text": text, "images": brought})
    messages = [{"role": turn["role"], "content": [*[{"type": "image"}] * turn["images"], {"type": "text", "text": turn["text"]}]
                 if turn["images"] else turn["text"]} for turn in turns]
    return messages, (images if keep_images else images[0])


def respond_with(engine, notice: str = "", max_question_chars: int = MAX_QUESTION_CHARS, keep_images: bool = False):
    """The chat function: checks the visitor's input, then streams the engine's answer."""
    def respond(message, history, temperature, top_p, max_new_tokens, request: gr.Request = None):
        if engine is None:
            yield notice
            return
        text = message.get("text") or ""
        try:
            check_text(text, max_question_chars)
        except UntrustedInputError as error:
            yield REFUSAL + str(error)
            return
        if not text.strip():
            yield ASK_FOR_QUESTION
            return
        messages, image = conversation_from(message, history, keep_images)
        if not image:
            yield ASK_FOR_IMAGE
            return
        session = request.session_hash if request else None
        answer = ""
        try:
            for answer in engine.stream(messages, image, float(temperature), float(top_p), int(max_new_tokens), session_id=session):
                yield answer
        except ChatError as error:
            yield REFUSAL + str(error)
        except NonFiniteScores as error:  # the answer so far stays, with why it stopped
            yield f"{answer}\n\n({error})".lstrip()

    return respond


def must_have_text(message: dict):
    """Gradio's validator: an empty message never reaches the chat (no empty bubble)."""
    has_text = bool((message or {}).get("text", "").strip()) or bool((message or {}).get("files"))
    return gr.validate(has_text, "Type a question (and attach an image to start a conversation).")


@dataclass
class DraftPolicy:
    """What the Data tab may do with a visitor's request. The remote (OpenAI-compatible) backend is off unless the
    operator turns it on; then only the listed base URLs are reachable, with the visitor's own key, unless the
    operator lends theirs (`operator_key`)."""
    remote: bool = False
    base_urls: list[str] = field(default_factory=lambda: ["https://api.openai.com/v1"])
    operator_key: str | None = None
    timeout: float = 30.0  # per request; with retries a slow server costs one visitor at most about a minute a kind
    max_retries: int = 1
    concurrency: int = 16  # drafting requests at once, apart from the chat's queue

    def options(self, backend: str, api_key: str, base_url: str) -> dict:
        """The drafting options for one request, or a ValueError to show the visitor."""
        if backend == "offline":
            return {}
        if backend != "openai":
            raise ValueError(f"unknown backend {backend!r}")
        if not self.remote:
            raise ValueError("the remote backend is off on this server (its operator can turn it on with "
                             "--remote-drafting); the offline backend works without it")
        base_url = (base_url or self.base_urls[0]).strip()
        if base_url not in self.base_urls:
            raise ValueError(f"this server drafts only through {', '.join(self.base_urls)}")
        key = (api_key or "").strip() or self.operator_key
        if not key:
            raise ValueError("type your API key: it is used for this request only and kept nowhere")
        return {"api_key": key, "base_url": base_url, "credentials_from_environment": False,
                "timeout": self.timeout, "max_retries": self.max_retries}


def make_draft(policy: DraftPolicy):
    def draft(record_json, captions, boxes, image, width, height, kinds, backend, api_key, base_url, model, seed):
        """The data tab's action: the same drafting API as llava-datagen. The key is used for this call only."""
        try:
            for what, text in (("the pasted record", record_json), ("the captions field", captions), ("the boxes field", boxes)):
                check_text(text or "", MAX_DRAFT_FIELD_CHARS, what)
            # A file path: measured from its header before it is decoded, and decoded no larger than the preview needs
            # (draw_boxes scales the annotation's boxes to the picture it is given).
            size = image_size(image) if image else (width, height)
            picture = open_image(image, max_side=PREVIEW_SIDE) if image else None
            annotation = annotation_from_text(record_json, captions, boxes, *size)
            options = policy.options(backend, api_key, base_url)
            records, rejects = draft_records(annotation, kinds=kinds or KINDS, backend=backend, seed=int(seed or 0),
                                             model=model or DEFAULT_DRAFT_MODEL, **options)
        except (AnnotationError, UntrustedInputError, ValueError) as error:
            raise gr.Error(str(error)) from None
        except openai.APIStatusError as error:  # the remote body is not shown: it is the remote's, not ours to echo
            raise gr.Error(f"the drafting server answered HTTP {error.status_code} ({type(error).__name__})") from None
        except openai.OpenAIError as error:
            raise gr.Error(f"the drafting request failed: {type(error).__name__}") from None
        text = json.dumps(records, indent=1, ensure_ascii=False)
        path = os.path.join(tempfile.mkdtemp(prefix="llava-data-"), "instruct.json")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        notes = [f"rejected {reject['id']}: {reject['reason']}" for reject in rejects]
        boxed = draw_boxes(picture, annotation) if picture is not None else None
        return boxed, as_chat(records), text + ("\n// " + "\n// ".join(notes) if notes else ""), path

    return draft


def data_tab(policy: DraftPolicy):
    gr.Markdown("Captions and boxes in, LLaVA instruction data out (conversation, detailed description, complex "
                "reasoning), as `llava-datagen` drafts it.")
    with gr.Row():
        with gr.Column():
            record_json = gr.Textbox(label="One record of the data-generation JSONL (optional; overrides the fields below)", lines=3)
            captions = gr.Textbox(label="Captions, one per line", lines=3, value="A red circle and a blue square on a white background.")
            boxes = gr.Textbox(label="Boxes, one per line: label: [x1, y1, x2, y2] in pixels", lines=3,
                               value="red circle: [20, 20, 120, 120]\nblue square: [200, 150, 300, 250]")
            # image_mode=None: Gradio hands over the path without decoding (its default, RGB, decodes to convert)
            image = gr.Image(type="filepath", image_mode=None, label="Image (optional: sets the size and shows the boxes)")
            with gr.Row():
                width = gr.Number(value=336, label="Width (without an image)", precision=0)
                height = gr.Number(value=336, label="Height", precision=0)
            kinds = gr.CheckboxGroup(list(KINDS), value=list(KINDS), label="Kinds")
            backend = gr.Radio(["offline", "openai"] if policy.remote else ["offline"], value="offline", label="Backend")
            api_key = gr.Textbox(type="password", visible=policy.remote,
                                 label="API key (openai backend; used for this request only, kept nowhere)")
            # Custom values pass the component so that DraftPolicy refuses them with its own message.
            base_url = gr.Dropdown(policy.base_urls, value=policy.base_urls[0], visible=policy.remote, allow_custom_value=True,
                                   label="Server (the ones this app's operator allows)")
            model = gr.Textbox(value=DEFAULT_DRAFT_MODEL, label="Model", visible=policy.remote)
            seed = gr.Number(value=0, label="Seed", precision=0)
            button = gr.Button("Draft", variant="primary")
        with gr.Column():
            boxed = gr.Image(label="Boxes", interactive=False)
            preview = gr.Chatbot(label="Preview")
            output = gr.Code(label="LLaVA JSON", language="json")
            download = gr.File(label="Download")
    button.click(make_draft(policy), [record_json, captions, boxes, image, width, height, kinds, backend, api_key, base_url,
                                      model, seed], [boxed, preview, output, download], api_name="draft",
                 concurrency_limit=policy.concurrency, concurrency_id="draft")


def build_demo(engine, notice: str = "", policy: DraftPolicy | None = None, about: str = "",
               defaults: dict | None = None, multi_image: bool = False) -> gr.Blocks:
    """The page. `engine` is a ChatEngine (or anything with its `stream`), or None with a `notice` to show instead.
    `multi_image`: a new image joins the conversation instead of starting a new one (for models trained so)."""
    policy, defaults = policy or DraftPolicy(), defaults or GENERATION_DEFAULTS
    with gr.Blocks(title="llava-plugin", delete_cache=DELETE_CACHE) as demo:
        gr.Markdown("# llava-plugin\nVisual instruction tuning: chat about an image, or draft instruction data.")
        with gr.Tab("Chat"):
            for text in (notice, about):
                if text:
                    gr.Markdown(text)
            settings = [  # render=False: the chat renders them inside its accordion, not above it
                gr.Slider(0.0, 1.0, value=defaults["temperature"], step=0.05, label="Temperature", render=False),
                gr.Slider(0.0, 1.0, value=defaults["top_p"], step=0.05, label="Top-p", render=False),
                gr.Slider(1, 1024, value=defaults["max_new_tokens"], step=1, label="Max new tokens", render=False),
            ]
            chat = gr.ChatInterface(
                respond_with(engine, notice, keep_images=multi_image),
                multimodal=True,
                api_name="chat",
                textbox=gr.MultimodalTextbox(file_types=["image"], file_count="single", render=False,
                                             placeholder="Ask about an image (attach one to start a conversation)"),
                # The message alone (no settings): clicking runs it with the sliders as they are, and the table
                # shows only questions and images. Copies: Gradio rewrites the files of what it is given.
                examples=[[{**example, "files": list(example["files"])}] for example in EXAMPLES
                          if os.path.exists(example["files"][0])] or None,
                run_examples_on_click=True,
                additional_inputs_accordion=gr.Accordion("Generation settings", open=False, render=False),
                additional_inputs=settings,
                validator=must_have_text,
                concurrency_limit=8,  # the engine serialises model steps itself; queued visitors still stream
            )
            if engine is not None and hasattr(engine, "reset"):
                def forget(request: gr.Request):  # Clear also drops what the server holds for this visitor
                    engine.reset(request.session_hash)

                chat.chatbot.clear(forget, api_visibility="undocumented", queue=False)
        with gr.Tab("Data"):
            data_tab(policy)
    demo.run_history = False  # Gradio's run history keeps inputs (the key box too) in the browser; keep nothing
    return demo


def load_engine(model: str):
    """A ChatEngine for a local folder or hub id; SystemExit with a clear message when there is none to load."""
    folder = os.path.expanduser(model)
    if os.path.abspath(folder) == EMBEDDED_MODEL and not os.path.isdir(folder):
        raise SystemExit(f"app.py: the embedded model {model} is missing: rebuild it with "
                         "`llava-shapes --export checkpoints/shapes-llava`, or pass --model PATH_OR_ID")
    try:
        return ChatEngine(model)
    except Exception as error:  # noqa: BLE001 (the command line's edge: whatever failed, say it in one line)
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        if os.path.isdir(folder):
            raise SystemExit(f"app.py: cannot load --model {model}: {reason}") from None
        if isinstance(error, ValueError):  # neither a folder nor a hub id: local_folder's message names it
            raise SystemExit(f"app.py: --model {error}") from None
        raise SystemExit(f"app.py: --model {model}: no such folder, and no such model on the hub, or the hub is "
                         f"unreachable ({reason})") from None


def load_backend(args: argparse.Namespace):
    """What answers the chat: our engine on --model, or any OpenAI-compatible server at --backend-url."""
    if args.backend_url:
        from engine.remote import RemoteChat  # noqa: PLC0415 (only a front end needs the client)

        return RemoteChat(args.backend_url, model=args.backend_model, api_key=os.environ.get("LLAVA_BACKEND_API_KEY"))
    return load_engine(args.model)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a llava_plugin model about an image, and draft instruction data.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder or hub id (default: %(default)s)")
    parser.add_argument("--backend-url", help="answer through this OpenAI-compatible server (llava-serve, vLLM, SGLang) "
                                              "instead of loading a model; its key from LLAVA_BACKEND_API_KEY")
    parser.add_argument("--backend-model", help="the model name to ask the --backend-url server for (default: its first)")
    # Spaces and containers set GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; an explicit flag wins.
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to listen on (default: $GRADIO_SERVER_NAME or 127.0.0.1)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                        help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    parser.add_argument("--multi-image", action="store_true",
                        help="a new image joins the conversation (for models trained on several images per "
                             "conversation, e.g. LLaVA-NeXT-Interleave); by default it starts a new one, as LLaVA")
    # Each also from an environment variable, as a Space's settings set them (Spaces pass no flags).
    drafting = parser.add_argument_group("the Data tab's remote backend (off by default)")
    drafting.add_argument("--remote-drafting", action="store_true", default=_env_flag("LLAVA_REMOTE_DRAFTING"),
                          help="let visitors draft through an OpenAI-compatible server with their own key "
                               "(or LLAVA_REMOTE_DRAFTING=1)")
    drafting.add_argument("--draft-base-url", action="append", metavar="URL",
                          help="a server visitors may draft through (repeatable, or LLAVA_DRAFT_BASE_URLS=URL,URL; "
                               "default: https://api.openai.com/v1)")
    drafting.add_argument("--draft-with-operator-key", action="store_true", default=_env_flag("LLAVA_DRAFT_WITH_OPERATOR_KEY"),
                          help="a visitor who types no key drafts on this server's OPENAI_API_KEY (only through the "
                               "allowed servers); mind the bill (or LLAVA_DRAFT_WITH_OPERATOR_KEY=1)")
    drafting.add_argument("--draft-timeout", type=float, default=30.0, help="seconds per drafting request (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.draft_base_url and os.environ.get("LLAVA_DRAFT_BASE_URLS"):
        args.draft_base_url = [url for url in os.environ["LLAVA_DRAFT_BASE_URLS"].split(",") if url.strip()]
    if args.draft_with_operator_key and not os.environ.get("OPENAI_API_KEY"):
        parser.error("--draft-with-operator-key needs OPENAI_API_KEY in the environment")
    if args.multi_image and args.backend_url:
        parser.error("--multi-image needs a model of our engine: --backend-url servers take one image a request")
    if (args.draft_base_url or args.draft_with_operator_key) and not args.remote_drafting:
        parser.error("--draft-base-url and --draft-with-operator-key need --remote-drafting")
    return args


def policy_from(args: argparse.Namespace) -> DraftPolicy:
    policy = DraftPolicy(remote=args.remote_drafting, timeout=args.draft_timeout,
                         operator_key=os.environ.get("OPENAI_API_KEY") if args.draft_with_operator_key else None)
    if args.draft_base_url:
        policy.base_urls = [url.strip() for url in args.draft_base_url]
    return policy


def page_for(args: argparse.Namespace) -> dict:
    """What the page says about the model and its slider defaults: the embedded model's own, or LLaVA's."""
    if not args.backend_url and os.path.abspath(os.path.expanduser(args.model)) == EMBEDDED_MODEL:
        return {"about": EMBEDDED_MODEL_NOTE, "defaults": EMBEDDED_MODEL_DEFAULTS}
    return {"about": "", "defaults": GENERATION_DEFAULTS}


if __name__ == "__main__":
    args = parse_args()
    demo = build_demo(load_backend(args), policy=policy_from(args), multi_image=args.multi_image, **page_for(args))
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD,
                        run_history=False)
else:  # imported (`gradio app.py`, a notebook, the tests): the model of $LLAVA_MODEL or the embedded one
    _args = parse_args([])
    demo = build_demo(load_backend(_args), **page_for(_args))
