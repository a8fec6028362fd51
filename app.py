"""The Gradio app: multi-turn image chat. Thin: it wires the UI to `engine`.

python app.py --model PATH_OR_ID [--host H] [--port N] [--share]
"""

import argparse
import os

import gradio as gr

from engine import ChatEngine, ChatError

DEFAULT_MODEL = os.environ.get("LLAVA_MODEL", "checkpoints/shapes")


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
        gr.Markdown("# llava-plugin\nVisual instruction tuning: chat about an image.")
        if notice:
            gr.Markdown(notice)
        gr.ChatInterface(
            respond,
            multimodal=True,
            api_name="chat",
            additional_inputs=[
                gr.Slider(0.0, 1.0, value=0.2, step=0.05, label="Temperature"),
                gr.Slider(0.0, 1.0, value=0.7, step=0.05, label="Top-p"),
                gr.Slider(1, 1024, value=512, step=1, label="Max new tokens"),
            ],
        )
    return demo


def load_engine(model: str) -> tuple[ChatEngine | None, str]:
    """An engine for a local folder or hub id, or None and a notice the page shows instead of answers."""
    if model == DEFAULT_MODEL and not os.path.isdir(model):
        return None, (
            f"**No model loaded.** The embedded default `{model}` has not been built yet (the shapes-world issue adds it). "
            "Start the app with `python app.py --model PATH` pointing at a llava_plugin checkpoint."
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
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share)
