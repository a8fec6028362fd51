"""Decode speed of `generate` compiled as one graph (static cache, CompileConfig(fullgraph=True)) vs eager decoding
(the default DynamicCache, and a static cache without compilation), same model, same image prompt, same run.

Decode tokens/s counts the tokens after the first one (the first comes out of the prefill), timed by a streamer at
each token. Greedy, batch 1, fp32; medians of --repeats interleaved runs after one warm-up run each (the compiled
one's warm-up is the compilation, reported apart). The answers of all three must be the same tokens.

python bench/bench_compile_decode.py [--model checkpoints/shapes-llava] [--new-tokens 64] [--repeats 5]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, CompileConfig
from transformers.generation.streamers import BaseStreamer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import llava_plugin  # noqa: E402, F401  (registers the Auto classes)


class TokenClock(BaseStreamer):
    """Records when each new token comes out (generate's first put is the prompt)."""

    def __init__(self):
        self.times, self.prompt_seen = [], False

    def put(self, value):
        if self.prompt_seen:
            self.times.extend([time.perf_counter()] * value.numel())
        self.prompt_seen = True

    def end(self):
        pass


def decode_rate(model, inputs, new_tokens: int, **kwargs) -> tuple[float, torch.Tensor]:
    clock = TokenClock()
    ids = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock, **kwargs)
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]), ids


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "shapes-llava"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model = AutoModel.from_pretrained(args.model, dtype=torch.float32).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (96, 96), (30, 40, 220)), text=prompt, return_tensors="pt").to(args.device)
    compile_config = CompileConfig(fullgraph=True, dynamic=False)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
    modes = {
        "eager, DynamicCache (the default)": {},
        "eager, static cache": {"cache_implementation": "static", "disable_compile": True},
        "compiled, static cache, fullgraph": {"cache_implementation": "static", "compile_config": compile_config},
    }
    rates, answers = {name: [] for name in modes}, {}
    for name, kwargs in modes.items():  # warm-up
        start = time.perf_counter()
        _, answers[name] = decode_rate(model, inputs, args.new_tokens, **kwargs)
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(args.repeats):
        for name, kwargs in modes.items():
            rate, ids = decode_rate(model, inputs, args.new_tokens, **kwargs)
            assert torch.equal(ids, answers[name]), f"{name}: the answer changed between runs"
            rates[name].append(rate)
    baseline = statistics.median(rates["eager, DynamicCache (the default)"])
    same = all(torch.equal(ids, answers["eager, DynamicCache (the default)"]) for ids in answers.values())
    print(f"model {args.model}, device {args.device}, prompt {inputs['input_ids'].shape[1]} tokens, "
          f"{args.new_tokens} new tokens, torch {torch.__version__}; same answers: {same}")
    print("| mode | decode tokens/s (median) | ratio to eager DynamicCache |\n| --- | --- | --- |")
    for name in modes:
        median = statistics.median(rates[name])
        print(f"| {name} | {median:,.1f} | {median / baseline:.2f} |")


if __name__ == "__main__":
    main()
