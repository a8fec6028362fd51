"""The chat engine: time to first token at turn 5 with KV reuse vs full recompute, and decode tokens/s vs
transformers' LlavaForConditionalGeneration.generate on the same weights, side by side in one run.

A 336px/14 tower (576 image tokens) and a LLaMA-style LM, random weights, made on the spot; greedy decoding. Each
engine configuration in turn: the default (on CUDA: static slots with CUDA graphs) and the eager DynamicCache path.
--anyres: LLaVA-NeXT's five grid pinpoints and a 672x672 image (2,928 image tokens: five tiles of 576 and 48 row
ends), against transformers' LlavaNextForConditionalGeneration.
python bench/bench_engine.py [--size small|7b] [--repeats 5] [--anyres]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from tiny_components import save_tokenizer  # noqa: E402

SIZES = {
    "small": dict(tower=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
                  lm=dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8)),
    "7b": dict(tower=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
               lm=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)),
}


LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build(folder: Path, size: str, device: str, pinpoints=None):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llava_plugin import LlavaPluginForConditionalGeneration

    tokenizer = save_tokenizer(folder / "llm")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                                     eos_token_id=tokenizer.eos_token_id, **SIZES[size]["lm"])).to(dtype).save_pretrained(folder / "llm")
        CLIPVisionModel(CLIPVisionConfig(image_size=336, patch_size=14, **SIZES[size]["tower"])).to(dtype).save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(folder / "clip")
    model, processor = LlavaPluginForConditionalGeneration.from_components(vision=str(folder / "clip"), llm=str(folder / "llm"), dtype=dtype,
                                                                           image_grid_pinpoints=pinpoints)
    model.save_pretrained(folder / "ours")
    processor.save_pretrained(folder / "ours")


def first_token_seconds(engine, messages, image, session):
    start = time.perf_counter()
    next(iter(engine.stream(messages, image, temperature=0.0, max_new_tokens=1, session_id=session)))
    return time.perf_counter() - start


def decode_rate(engine, messages, image, new_tokens: int) -> float:
    stream = engine.stream(messages, image, temperature=0.0, max_new_tokens=new_tokens, session_id=None)
    next(stream)
    first = time.perf_counter()
    count = 1 + sum(1 for _ in stream)
    if count != new_tokens:
        raise SystemExit(f"the engine stopped after {count} of {new_tokens} tokens: rates would not compare")
    return (new_tokens - 1) / (time.perf_counter() - first)


def turn5_ttft(engine, session: str, image, answer: str, repeats: int) -> tuple[float, float, int]:
    """Medians of (reuse, full recompute) for turn 5 after four turns of history in `session`; one warm-up round
    first (it captures the CUDA graphs of the steps it needs)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    for turn in range(4):  # four turns of history, each answered with a fixed sentence of about 40 tokens
        list(engine.stream(messages, image, temperature=0.0, max_new_tokens=1, session_id=session))
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"Tell me more about part {turn}."}]
    reuse, full = [], []
    for repeat in range(repeats + 1):  # turn 5 with a new question each time: the session's cache holds turns 1-4
        turn5 = messages[:-1] + [{"role": "user", "content": f"Tell me more about part {repeat}, please."}]
        full.append(first_token_seconds(engine, turn5, image, None))
        reuse.append(first_token_seconds(engine, turn5, image, session))
    prompt = engine.processor.apply_chat_template(turn5, add_generation_prompt=True)
    return statistics.median(reuse[1:]), statistics.median(full[1:]), len(engine.processor(images=image, text=prompt)["input_ids"][0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--anyres", action="store_true", help="an AnyRes (LLaVA-NeXT) model and a 672x672 image")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from engine import ChatEngine
    from llava_plugin.convert import convert

    answer = ("There are two shapes in the image: a red circle at the top left and a blue square at the bottom "
              "right, both on a white background, and the circle is the larger of the two.")
    image = Image.effect_noise((672, 672) if args.anyres else (500, 375), 50).convert("RGB")
    reference = LlavaNextForConditionalGeneration if args.anyres else LlavaForConditionalGeneration
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        build(folder, args.size, device, LLAVA_NEXT_PINPOINTS if args.anyres else None)
        engine = ChatEngine(str(folder / "ours"), device=device)
        slots = engine.slots
        rows = {}  # engine configuration -> (TTFT reuse, TTFT full, decode tokens/s)
        for name in (["static slots + CUDA graphs" if device == "cuda" else "static slots"] if slots is not None else []) + ["dynamic cache, eager steps"]:
            engine.slots = slots if name.startswith("static") else None
            reuse, full, prompt_tokens = turn5_ttft(engine, name, image, answer, args.repeats)
            decode_rate(engine, first, image, args.new_tokens)  # warm-up
            rate = statistics.median(decode_rate(engine, first, image, args.new_tokens) for _ in range(args.repeats))
            rows[name] = reuse, full, rate
        engine.slots = slots

        convert(str(folder / "ours"), str(folder / "hf"), to="llava-hf")
        hf = reference.from_pretrained(folder / "hf").to(device).eval()
        processor = AutoProcessor.from_pretrained(folder / "hf")
        inputs = processor(images=image, text=processor.apply_chat_template(first, add_generation_prompt=True), return_tensors="pt").to(device)
        hf_rates = []
        with torch.no_grad():
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                hf.generate(**inputs, max_new_tokens=1, do_sample=False)
                first_token = time.perf_counter() - start
                start = time.perf_counter()
                hf.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
                hf_rates.append((args.new_tokens - 1) / (time.perf_counter() - start - first_token))
        hf_rate = statistics.median(hf_rates[1:])
    image_tokens = int((engine.processor(images=image, text="<image>", return_tensors="pt")["input_ids"][0] == engine.processor.image_token_id).sum())
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, size {args.size}, "
          f"turn-5 prompt {prompt_tokens} tokens ({image_tokens} image), medians of {args.repeats} after one warm-up")
    fastest_full = min(full for _, full, _ in rows.values())
    for name, (reuse, full, rate) in rows.items():
        print(f"{name}: TTFT turn 5 reuse {reuse * 1000:.1f} ms, full recompute {full * 1000:.1f} ms (ratio {reuse / full:.3f}); "
              f"decode {rate:.1f} tokens/s")
    best = next(iter(rows))
    print(f"TTFT ratio, engine default reuse / fastest full recompute: {rows[best][0] * 1000:.1f} / {fastest_full * 1000:.1f} ms = "
          f"{rows[best][0] / fastest_full:.3f}")
    print(f"decode tokens/s: engine default {rows[best][2]:.1f}, transformers {reference.__name__}.generate {hf_rate:.1f}: "
          f"ratio {rows[best][2] / hf_rate:.2f}")


if __name__ == "__main__":
    main()
