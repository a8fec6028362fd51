"""A decode step of the embedded model on the CPU in float16, bfloat16 and float32, at 1 and 8 rows: why
ChatEngine's dtype "auto" runs a half-precision checkpoint in float32 on a CPU (engine.chat.compute_dtype).

python bench/decode_dtypes.py [--model checkpoints/shapes-llava] [--steps 200] [--threads 1]

Each step feeds one token per row over a DynamicCache that starts with an 80-token prompt per row (unpadded), as
the scheduler's steps do; the time per step is the median of three runs of --steps steps, against float32's."""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoModel, DynamicCache  # noqa: E402


@torch.no_grad()
def step_ms(model, rows: int, steps: int) -> float:
    cache = DynamicCache(config=model.config.get_text_config())
    vocabulary = model.config.get_text_config().vocab_size
    model(input_ids=torch.randint(3, vocabulary - 1, (rows, 80)), cache=cache, use_cache=True, logits_to_keep=1)
    positions = torch.full((rows, 1), 80)
    start = time.perf_counter()
    for _ in range(steps):
        logits = model(input_ids=torch.randint(3, vocabulary - 1, (rows, 1)), cache=cache, position_ids=positions,
                       use_cache=True, logits_to_keep=1).logits
        logits.argmax(-1).tolist()
        positions = positions + 1
    return (time.perf_counter() - start) / steps * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "shapes-llava"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (llava-serve's engine process: cores - 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for dtype in ("float32", "float16", "bfloat16"):
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, dtype=getattr(torch, dtype)).eval()
        results[dtype] = {rows: statistics.median(step_ms(model, rows, args.steps) for _ in range(3)) for rows in (1, 8)}
    print("| dtype | 1 row ms | x float32 | 8 rows ms | x float32 |")
    print("| --- | --- | --- | --- | --- |")
    for dtype, times in results.items():
        print(f"| {dtype} | {times[1]:.2f} | {times[1] / results['float32'][1]:.2f} | {times[8]:.2f} | "
              f"{times[8] / results['float32'][8]:.2f} |")


if __name__ == "__main__":
    main()
