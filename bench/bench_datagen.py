"""Data generation: concurrent vs sequential drafting against a loopback chat-completions server with fixed latency.

python bench/bench_datagen.py [--drafts 1000] [--latency 0.1] [--concurrency 64]

Both runs use the real openai client and the whole pipeline (parsing, progress log, output); ratio = concurrent
drafts/s divided by sequential drafts/s, measured in the same run.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_openai import FakeOpenAI  # noqa: E402
from trainer.datagen import DatagenConfig, generate  # noqa: E402


def annotations(folder: Path, images: int) -> Path:
    path = folder / "ann.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"i{n}", "image": f"{n}.jpg", "width": 640, "height": 480,
                                          "captions": [f"a kitchen scene number {n}"],
                                          "boxes": [{"label": "cup", "bbox": [10, 20, 110, 220]}]}) for n in range(images)))
    return path


def timed_run(source: Path, output: Path, server: FakeOpenAI, drafts: int, concurrency: int) -> float:
    config = DatagenConfig(inputs=[str(source)], output=str(output), kinds=("conversation",), backend="openai",
                           base_url=server.base_url, api_key="sk-bench", concurrency=concurrency, limit=drafts, progress_bar=False)
    start = time.perf_counter()
    summary = generate(config)
    elapsed = time.perf_counter() - start
    assert summary.accepted == drafts, summary
    return drafts / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafts", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, FakeOpenAI(latency=args.latency) as server:
        folder = Path(folder)
        source = annotations(folder, args.drafts)
        concurrent = timed_run(source, folder / "concurrent.json", server, args.drafts, args.concurrency)
        sequential = timed_run(source, folder / "sequential.json", server, args.drafts, 1)
    print(f"{args.drafts} drafts, server latency {args.latency * 1000:.0f} ms")
    print(f"| run | drafts/s |\n| --- | --- |\n| concurrent ({args.concurrency}) | {concurrent:.1f} |\n| sequential | {sequential:.1f} |")
    print(f"ratio concurrent/sequential: {concurrent / sequential:.1f}x")


if __name__ == "__main__":
    main()
