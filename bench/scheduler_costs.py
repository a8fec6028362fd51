"""Where the scheduler's time goes, in-process (no HTTP, no client): the engine answering bench_serve's requests
over 1 and N request threads for a few seconds each, with the scheduler's parts timed by wrapping them.

python bench/scheduler_costs.py [--streams 8] [--seconds 8] [--dtype float32] [--threads 1] [--batch rows|padded]

Prints requests/s and tokens/s at 1 stream and at N (the ratio is the engine's own, without llava-serve's HTTP
process and the client), then per request the time in decode steps, prefill forwards, rows joining without one
(row_batch's riders) and rows leaving the batch, and a decode step's median cost by the number of rows, right after a row joined or
left ("fresh") and otherwise. Timing wrappers add a few microseconds per call."""

import argparse
import collections
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

from bench_serve import requests  # noqa: E402
from engine import ChatEngine  # noqa: E402
from engine.padded_batch import PaddedBatch  # noqa: E402
from engine.row_batch import RowBatch  # noqa: E402
from engine.decoding import Sampling  # noqa: E402
from engine.media import MediaPolicy  # noqa: E402
from engine.openai_api import engine_messages, parse_request  # noqa: E402

spent, calls, steps = collections.defaultdict(float), collections.Counter(), []


def timed(owner, name: str):
    wrapped = getattr(owner, name)

    def timing(*args, **kwargs):
        start = time.perf_counter()
        try:
            return wrapped(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
            calls[name] += 1
            if name in ("prefill", "ride", "remove"):
                args[0].fresh = True  # the next step runs on caches just built
            elif name == "step":
                batch = args[0]
                steps.append((len(batch.rows), getattr(batch, "fresh", False), time.perf_counter() - start))
                batch.fresh = False

    setattr(owner, name, timing)


def run(engine, batch: list, streams: int, seconds: float) -> tuple[int, int, float]:
    """(requests, completion tokens, wall seconds) of `streams` threads asking in turn until `seconds` pass."""
    counter, done, lock = itertools.count(), [0, 0], threading.Lock()
    stop = time.monotonic() + seconds

    def ask():
        while time.monotonic() < stop:
            messages, images = batch[next(counter) % len(batch)]
            for progress in engine.generate(messages, images, Sampling(0.0, 1.0, 64), interval=0.02):
                pass
            with lock:
                done[0], done[1] = done[0] + 1, done[1] + progress.completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=ask) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done[0], done[1], time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (llava-serve's engine process: cores - 1)")
    parser.add_argument("--batch", choices=["rows", "padded"], default="rows",
                        help="the scheduler's batch: row_batch (the default) or padded_batch (the fallback)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = ChatEngine(str(ROOT / "checkpoints" / "shapes-llava"), device="cpu", dtype=args.dtype)
    kind = RowBatch if args.batch == "rows" else PaddedBatch
    engine.scheduler._batch = kind(engine.model)
    batch = [engine_messages(parse_request(json.dumps({"model": "m", "messages": messages}).encode()), MediaPolicy())
             for messages in requests(64, "scheduler costs")]
    run(engine, batch, 4, 1.0)  # warm-up
    alone = run(engine, batch, 1, args.seconds)
    for name in ("prefill", "ride", "step", "remove"):
        if hasattr(kind, name):
            timed(kind, name)
    together = run(engine, batch, args.streams, args.seconds)
    for streams, (count, tokens, wall) in ((1, alone), (args.streams, together)):
        print(f"{streams} stream(s): {count / wall:.1f} requests/s, {tokens / wall:.0f} tokens/s, {tokens / count:.1f} tokens per answer")
    print(f"x one at a time: {together[1] / together[2] / (alone[1] / alone[2]):.2f}")
    count = together[0]
    for name in ("step", "prefill", "ride", "remove"):
        if calls[name]:
            print(f"  {name:8s} {spent[name] / count * 1e3:5.2f} ms per request ({calls[name]} calls, {spent[name] / calls[name] * 1e3:.2f} ms each)")
    by_rows = collections.defaultdict(lambda: ([], []))
    for rows, fresh, seconds in steps:
        by_rows[rows][0 if fresh else 1].append(seconds * 1e3)
    for rows in sorted(by_rows):
        fresh, stale = by_rows[rows]
        median = lambda values: f"{statistics.median(values):.2f} ms ({len(values)})" if values else "-"
        print(f"  a step of {rows} rows: fresh {median(fresh)}, otherwise {median(stale)}")


if __name__ == "__main__":
    main()
