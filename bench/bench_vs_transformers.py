"""llava_plugin against transformers' own LlavaForConditionalGeneration on identical weights.

Both models are built at LLaVA-1.5-7B shapes (CLIP ViT-L/14-336 + a 7B LLaMA, 576 image tokens) with random
weights, the same tensors loaded into each. The run checks that they agree (logits, greedy tokens) and times, side
by side: time to first token (tower + prefill) and decode tokens/s. Ratio = ours / transformers'.

python bench/bench_vs_transformers.py [--size 7b|tiny] [--new-tokens 128] [--repeats 5]
"""

import argparse
import statistics
import time

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from llava_plugin import LlavaPluginConfig, LlavaPluginForConditionalGeneration
from llava_plugin.convert import HF_TO_PLUGIN, rename

SIZES = {
    "7b": dict(
        vision=dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, projection_dim=768),
        text=dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, max_position_embeddings=4096),
    ),
    "tiny": dict(
        vision=dict(image_size=336, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
        text=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=4096),
    ),
}
IMAGE_TOKEN = 32000


def build_pair(size: str, device: str, dtype: torch.dtype):
    vision, text = CLIPVisionConfig(**SIZES[size]["vision"]), LlamaConfig(**SIZES[size]["text"])
    image_token = min(IMAGE_TOKEN, text.vocab_size - 1)
    ours_config = LlavaPluginConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projector_type="mlp2x_gelu",
                                    image_token_id=image_token)
    theirs_config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token,
                                image_seq_length=ours_config.image_seq_length)
    with torch.device(device):
        torch.manual_seed(0)
        ours = LlavaPluginForConditionalGeneration(ours_config).to(dtype).eval()
        theirs = LlavaForConditionalGeneration(theirs_config).to(dtype).eval()
    renamed = rename(ours.state_dict(), [(new, old) for old, new in HF_TO_PLUGIN])
    missing, unexpected = theirs.load_state_dict(renamed, strict=False)
    assert not unexpected and not [key for key in missing if "position_ids" not in key], (missing, unexpected)
    return ours, theirs, image_token, ours_config.image_seq_length


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, inputs, new_tokens, device):
    """(seconds to the first token, decode tokens/s, tokens)."""
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    sync(device)
    total = time.perf_counter() - start
    return first, (new_tokens - 1) / max(total - first, 1e-9), out[0, inputs["input_ids"].shape[1]:]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="7b")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ours, theirs, image_token, seq = build_pair(args.size, device, dtype)

    generator = torch.Generator().manual_seed(1)
    text = torch.randint(3, 31000 if args.size == "7b" else 900, (1, 40), generator=generator)
    input_ids = torch.cat([text[:, :5], torch.full((1, seq), image_token), text[:, 5:]], dim=1).to(device)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  pixel_values=torch.randn(1, 3, 336, 336, generator=generator).to(device, dtype))
    with torch.no_grad():
        ours_logits, theirs_logits = ours(**inputs).logits.float(), theirs(**inputs).logits.float()
    print(f"device {device} {torch.cuda.get_device_name() if device == 'cuda' else ''} dtype {dtype} size {args.size} "
          f"prompt {input_ids.shape[1]} tokens ({seq} image)")
    print(f"logits max abs diff: {(ours_logits - theirs_logits).abs().max().item():.3g} "
          f"(scale {theirs_logits.abs().max().item():.3g})")

    rows = {"ours": [], "transformers": []}
    for _ in range(args.repeats):  # interleaved so drift hits both alike
        for name, model in (("ours", ours), ("transformers", theirs)):
            rows[name].append(timed_generate(model, inputs, args.new_tokens, device))
    ours_tokens, theirs_tokens = rows["ours"][-1][2], rows["transformers"][-1][2]
    differ = (ours_tokens != theirs_tokens).nonzero()
    print(f"greedy {args.new_tokens} tokens identical: {not len(differ)}"
          + (f" (first difference at token {int(differ[0])})" if len(differ) else ""))
    if len(differ):  # how close was the call? top-2 logit margin where they part, from a full forward of the shared prefix
        step = int(differ[0])
        prefix = torch.cat([input_ids, ours_tokens[None, :step]], dim=1)
        with torch.no_grad():
            last = ours(**{**inputs, "input_ids": prefix, "attention_mask": torch.ones_like(prefix)}).logits[0, -1].float()
        top = last.topk(2)
        print(f"at token {step}: top-2 logits {top.values.tolist()} (ids {top.indices.tolist()}), "
              f"ours chose {int(ours_tokens[step])}, transformers {int(theirs_tokens[step])}")
    print(f"each model repeats its own tokens: ours {all(torch.equal(r[2], ours_tokens) for r in rows['ours'])}, "
          f"transformers {all(torch.equal(r[2], theirs_tokens) for r in rows['transformers'])}")
    print("attention:", ours.config.text_config._attn_implementation, ours.config.vision_config._attn_implementation,
          "vs", theirs.config.text_config._attn_implementation, theirs.config.vision_config._attn_implementation)
    print("decode tokens/s per repeat:", {name: [round(r[1], 1) for r in runs] for name, runs in rows.items()})
    ttft = {name: statistics.median(r[0] for r in runs) for name, runs in rows.items()}
    tps = {name: statistics.median(r[1] for r in runs) for name, runs in rows.items()}
    print("| model | time to first token (ms) | decode tokens/s |")
    print("| --- | --- | --- |")
    for name in rows:
        print(f"| {name} | {ttft[name] * 1000:.1f} | {tps[name]:.1f} |")
    print(f"ratio ours/transformers: TTFT {ttft['ours'] / ttft['transformers']:.3f}, decode tokens/s {tps['ours'] / tps['transformers']:.3f}")


if __name__ == "__main__":
    main()
