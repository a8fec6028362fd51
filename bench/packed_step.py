"""A request joining a decoding batch with a short prompt left to feed: as a rider, in the packed decode step
(RowBatch.ride, then step), against the baseline of its own prefill forward followed by a plain step
(RowBatch.prefill, then step); and a plain step without it.

python bench/packed_step.py [--rows 7] [--prompt 30] [--repeats 200] [--dtype float32] [--threads 1]

The batch: `--rows` sequences of 60-66 cached tokens each, decoding; the joiner: 40 cached tokens and `--prompt` new
ones. Times are means over --repeats fresh batches, the embedded model on the CPU."""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from engine import ChatEngine  # noqa: E402
from engine.decoding import Sampling  # noqa: E402
from engine.row_batch import RowBatch  # noqa: E402
from engine.scheduler import Sequence  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ChatEngine(str(ROOT / "checkpoints" / "shapes-llava"), device="cpu", dtype=args.dtype).model
    config, vocabulary = model.config.get_text_config(), model.config.get_text_config().vocab_size

    def sequence(cached: int, pending: int) -> Sequence:
        cache = DynamicCache(config=config)
        model(input_ids=torch.randint(3, vocabulary - 1, (1, cached)), cache=cache, use_cache=True)
        return Sequence(cache, torch.randint(3, vocabulary - 1, (1, pending)), {}, Sampling(0.0, 1.0, 64), set())

    def decoding() -> RowBatch:
        batch = RowBatch(model)
        batch.prefill([sequence(60 + row, 1) for row in range(args.rows)])
        for row in batch.rows:
            row.tokens.append(5)
        return batch

    spent = {"plain step": 0.0, "ride + packed step": 0.0, "prefill + plain step": 0.0}
    with torch.no_grad():
        for _ in range(args.repeats):
            batch = decoding()
            start = time.perf_counter()
            batch.step()
            spent["plain step"] += time.perf_counter() - start
            batch, joiner = decoding(), sequence(40, args.prompt)
            start = time.perf_counter()
            batch.ride([joiner])
            batch.step()
            spent["ride + packed step"] += time.perf_counter() - start
            batch, joiner = decoding(), sequence(40, args.prompt)
            start = time.perf_counter()
            batch.prefill([joiner])
            joiner.tokens.append(5)
            batch.step()
            spent["prefill + plain step"] += time.perf_counter() - start
    baseline = spent["prefill + plain step"]
    print(f"{args.rows} rows decoding, a joiner with {args.prompt} tokens to feed ({args.dtype}, {args.threads} thread(s))")
    print("| | ms | x prefill + plain step |")
    print("| --- | --- | --- |")
    for name, seconds in spent.items():
        print(f"| {name} | {seconds / args.repeats * 1e3:.2f} | {seconds / baseline:.2f} |")


if __name__ == "__main__":
    main()
