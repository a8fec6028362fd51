"""The Gradio app: multi-turn image chat. Thin: it wires the UI to `engine`.

python app.py --model PATH_OR_ID [--host H] [--port N] [--share]
"""

import argparse
import json
import os
import tempfile

import gradio as gr
import openai

from engine import ChatEngine, ChatError
from trainer.datagen import KINDS, AnnotationError, draft_records
from trainer.datagen.openai_backend import DEFAULT_MODEL as DEFAULT_DRAFT_MODEL
from trainer.datagen.preview import annotation_from_text, as_chat, draw_boxes

MAX_UPLOAD = "25mb"  # larger uploads are refused by Gradio with a message; huge images are downscaled by the engine
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
DEFAULT_MODEL = os.environ.get("LLAVA_MODEL", os.path.join(HERE, "checkpoints", "shapes-llava"))


def conversation_from(message: dict, history: list[dict]) -> tuple[list[dict], str | None]:
    """Gradio's history + new message -> (chat-template messages with the image in the first user turn, image path)."""
    turns, image = [], None
    files = [{"path": file} if isinstance(file, str) else file for file in message.get("files", [])]
    if files:
        history = []  # a new image starts a new conversation, as in LLaVA
    for item in [*history, {"role": "user", "content": [*files, message.get("text", "")]}]:
        contents = item["content"] if isinstance(item["content"], (list, tuple)) else [item["content"]]
        for part in contents:
            path = part.get("path") or (part.get("file") or {}).get("path") if isinstance(part, dict) else None
            text = part if isinstance(part, str) else (part.get("text") if isinstance(part, dict) else None)
            if path and image is None:
                image = path
            elif text:
                if turns and turns[-1]["role"] == item["role"]:
                    turns[-1]["text"] += "\n" + text
                else:
                    turns.append({"role": item["role"], "text": text})
    messages = [{"role": turn["role"], "content": turn["text"]} for turn in turns]
    if image is not None and messages and messages[0]["role"] == "user":
        messages[0]["content"] = [{"type": "image"}, {"type": "text", "text": messages[0]["content"]}]
    return messages, image


def build_demo(engine: ChatEngine | None, notice: str = "") -> gr.Blocks:
    def respond(message, history, temperature, top_p, max_new_tokens, request: gr.Request):
        if engine is None:
            yield notice
            return
        session = request.session_hash if request else None
        messages, image = conversation_from(message, history)
        if not message.get("text", "").strip():
            yield "Please type a question about the image."
            return
        if image is None and session:  # an API client sends one turn at a time: continue its conversation
            earlier, image = engine.conversation(session)
            messages = earlier + messages
        if image is None:
            yield "Please attach an image to your first message."
            return
        try:
            yield from engine.stream(messages, image, temperature, top_p, int(max_new_tokens), session_id=session)
        except ChatError as error:
            yield f"Sorry, I could not use that input: {error}"

    with gr.Blocks(title="llava-plugin") as demo:
        gr.Markdown("# llava-plugin\nVisual instruction tuning: chat about an image, or draft instruction data.")
        with gr.Tab("Chat"):
            if notice:
                gr.Markdown(notice)
            gr.ChatInterface(
                respond,
                multimodal=True,
                api_name="chat",
                examples=[[example, 0.2, 0.7, 512] for example in EXAMPLES if os.path.exists(example["files"][0])] or None,
                additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
                additional_inputs=[
                    gr.Slider(0.0, 1.0, value=0.2, step=0.05, label="Temperature"),
                    gr.Slider(0.0, 1.0, value=0.7, step=0.05, label="Top-p"),
                    gr.Slider(1, 1024, value=512, step=1, label="Max new tokens"),
                ],
            )
        with gr.Tab("Data"):
            data_tab()
    return demo


def draft(record_json, captions, boxes, image, width, height, kinds, backend, api_key, base_url, model, seed):
    """The data tab's action: the same drafting API as llava-datagen. The key is used for this call only."""
    try:
        size = image.size if image is not None else (width, height)
        annotation = annotation_from_text(record_json, captions, boxes, *size)
        options = {"model": model, "base_url": base_url or None, "api_key": api_key or None} if backend == "openai" else {}
        records, rejects = draft_records(annotation, kinds=kinds or KINDS, backend=backend, seed=int(seed or 0), **options)
    except (AnnotationError, ValueError) as error:
        raise gr.Error(str(error)) from error
    except openai.OpenAIError as error:
        raise gr.Error(f"the OpenAI request failed: {type(error).__name__}: {error}") from error
    text = json.dumps(records, indent=1, ensure_ascii=False)
    path = os.path.join(tempfile.mkdtemp(prefix="llava-data-"), "instruct.json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    notes = [f"rejected {reject['id']}: {reject['reason']}" for reject in rejects]
    boxed = draw_boxes(image, annotation) if image is not None else None
    return boxed, as_chat(records), text + ("\n// " + "\n// ".join(notes) if notes else ""), path


def data_tab():
    gr.Markdown("Captions and boxes in, LLaVA instruction data out (conversation, detailed description, complex "
                "reasoning), as `llava-datagen` drafts it.")
    with gr.Row():
        with gr.Column():
            record_json = gr.Textbox(label="One record of the data-generation JSONL (optional; overrides the fields below)", lines=3)
            captions = gr.Textbox(label="Captions, one per line", lines=3, value="A red circle and a blue square on a white background.")
            boxes = gr.Textbox(label="Boxes, one per line: label: [x1, y1, x2, y2] in pixels", lines=3,
                               value="red circle: [20, 20, 120, 120]\nblue square: [200, 150, 300, 250]")
            image = gr.Image(type="pil", label="Image (optional: sets the size and shows the boxes)")
            with gr.Row():
                width = gr.Number(value=336, label="Width (without an image)", precision=0)
                height = gr.Number(value=336, label="Height", precision=0)
            kinds = gr.CheckboxGroup(list(KINDS), value=list(KINDS), label="Kinds")
            backend = gr.Radio(["offline", "openai"], value="offline", label="Backend")
            api_key = gr.Textbox(type="password", label="OpenAI API key (openai backend; used for this request only)")
            base_url = gr.Textbox(label="Base URL (any OpenAI-compatible server; optional)")
            model = gr.Textbox(value=DEFAULT_DRAFT_MODEL, label="Model")
            seed = gr.Number(value=0, label="Seed", precision=0)
            button = gr.Button("Draft", variant="primary")
        with gr.Column():
            boxed = gr.Image(label="Boxes", interactive=False)
            preview = gr.Chatbot(label="Preview")
            output = gr.Code(label="LLaVA JSON", language="json")
            download = gr.File(label="Download")
    button.click(draft, [record_json, captions, boxes, image, width, height, kinds, backend, api_key, base_url, model, seed],
                 [boxed, preview, output, download], api_name="draft")


def load_engine(model: str) -> tuple[ChatEngine | None, str]:
    """An engine for a local folder or hub id, or None and a notice the page shows instead of answers."""
    if model == DEFAULT_MODEL and not os.path.isdir(model):
        return None, (
            f"**No model loaded.** The embedded default `{model}` is missing: rebuild it with "
            "`llava-shapes --export checkpoints/shapes-llava`, or start the app with `python app.py --model PATH`."
        )
    try:
        return ChatEngine(model), ""
    except (OSError, ValueError) as error:
        return None, f"**Could not load model `{model}`:** {error}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a llava_plugin model about an image.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint folder or hub id (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    return parser.parse_args(argv)


demo = build_demo(*load_engine(DEFAULT_MODEL))

if __name__ == "__main__":
    args = parse_args()
    if args.model != DEFAULT_MODEL:
        demo = build_demo(*load_engine(args.model))
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, max_file_size=MAX_UPLOAD)
