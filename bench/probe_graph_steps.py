"""Probe (GPU, not a benchmark): each bucket's CUDA-graph step time for a model size, and how far a reused turn's
logits are from one forward over the whole prompt, for the graphed slot and for the eager DynamicCache path, in the
model's dtype and in fp32 (so rounding can be told from a bookkeeping error).
python bench/probe_graph_steps.py [--size 7b] [--prompt 1045]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_engine import SIZES, build  # noqa: E402

from engine import ChatEngine  # noqa: E402
from engine.static_slots import BUCKETS, StaticSlot  # noqa: E402


@torch.no_grad()
def distances(model, ids: torch.Tensor, cached: int) -> str:
    reference = model(input_ids=ids).logits[0, -1].float()
    cache = DynamicCache(config=model.config.get_text_config())
    model(input_ids=ids[:, :cached], cache=cache, use_cache=True)
    dynamic = model(input_ids=ids[:, cached:], cache=cache, use_cache=True).logits[0, -1].float()
    slot = StaticSlot(model, 2048, graphs=True, pool=torch.cuda.graph_pool_handle())  # a pool dies with its last graph
    slot.forward(ids[:, :cached], {})
    graphed = slot.forward(ids[:, cached:], {})[0].float()
    return (f"logit scale {reference.abs().max():.2f}; max abs difference from one forward: DynamicCache reuse "
            f"{(dynamic - reference).abs().max():.4f}, graphed slot {(graphed - reference).abs().max():.4f}; same argmax: "
            f"{int(dynamic.argmax()) == int(reference.argmax())}, {int(graphed.argmax()) == int(reference.argmax())}")


@torch.no_grad()
def step_times(model, ids: torch.Tensor) -> None:
    slot = StaticSlot(model, 2048, graphs=True, pool=torch.cuda.graph_pool_handle())  # a pool dies with its last graph
    slot.forward(ids, {})
    prompt = ids.shape[1]
    for bucket in BUCKETS:
        new = torch.zeros((1, bucket), dtype=torch.long, device=ids.device)
        slot.forward(new, {})  # captures
        times = []
        for _ in range(10):
            slot.crop(prompt - slot.get_seq_length())
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            slot.forward(new, {})
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        slot.crop(prompt - slot.get_seq_length())
        print(f"bucket {bucket}: graph step {statistics.median(times):.2f} ms (after {prompt} cached tokens)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="7b")
    parser.add_argument("--prompt", type=int, default=1045)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        build(Path(temporary), args.size, "cuda")
        engine = ChatEngine(str(Path(temporary) / "ours"), device="cuda")
    model = engine.model
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.image_token_id, (1, args.prompt + 16), device="cuda")
    step_times(model, ids[:, : args.prompt])
    print(f"{model.dtype}: {distances(model, ids, args.prompt)}", flush=True)
    model.float()
    print(f"{model.dtype}: {distances(model, ids, args.prompt)}", flush=True)


if __name__ == "__main__":
    main()
