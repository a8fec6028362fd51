"""llava-serve under load: aggregate completion tokens/s with 1, 4, 8 and 16 concurrent streams, against the same
requests one at a time (1 stream) in the same run, and time to first token (p50/p95) under each load.

python bench/bench_serve.py [--model checkpoints/shapes-llava] [--requests 128] [--max-tokens 64] [--rounds 3] [--dtype auto] [--stream-interval S]
                             [--single-process] [--threads N]

The server runs in its own process (as in production: the client's threads do not share its interpreter), on a
free loopback port, and is stopped at the end. Each load level gets its own system prompt, so no level finds the
requests of another in the prefix cache: every level prefills the same amount."""

import argparse
import base64
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Describe the image in detail.", "What color is the circle?", "How many shapes are in the image?",
             "Where is the yellow triangle?", "Is there a blue square in the image?", "Describe the image.",
             "What shapes are in the image?", "What color is the square?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def requests(count: int, tag: str) -> list[list[dict]]:
    """`count` conversations; each block of 32 has a system prompt of its own, so that a longer run has the same mix
    of prompts the prefix cache knows (8 of 32: the three images and eight questions repeat every 24) as the
    default one."""
    images = [base64.b64encode(path.read_bytes()).decode() for path in sorted((ROOT / "examples").glob("*.png"))]
    return [[{"role": "system", "content": f"A chat about a picture of shapes ({tag}{f', part {index // 32}' if index >= 32 else ''})."},
             {"role": "user", "content": [{"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]},
                                          {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{images[index % len(images)]}"}}]}]
            for index in range(count)]


def one(client, model: str, messages, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first content, completion tokens) of one streamed greedy request."""
    start, first, tokens = time.perf_counter(), None, 0
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return first if first is not None else time.perf_counter() - start, tokens


def load(client, model: str, streams: int, batch: list, max_tokens: int) -> tuple[float, int, list[float]]:
    """(wall seconds, completion tokens, TTFTs) of `batch` sent over `streams` concurrent streams."""
    start = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda messages: one(client, model, messages, max_tokens), batch))
    return time.perf_counter() - start, sum(count for _, count in results), [ttft for ttft, _ in results]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes(server: subprocess.Popen) -> dict[str, list[int]]:
    """The HTTP process and its children (the engine's process, multiprocessing's resource tracker)."""
    try:
        children = [int(pid) for pid in Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()]
    except OSError:
        children = []
    return {"HTTP process": [server.pid], "engine process": children}


def cpu_now(server: subprocess.Popen) -> dict[str, float]:
    return {**{name: sum(map(cpu_seconds, pids)) for name, pids in processes(server).items()}, "client": time.process_time()}


def metrics(port: int) -> dict[str, float]:
    """llava-serve's /metrics as {name: value}."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {name: float(value) for name, value in (line.split() for line in text.splitlines() if line and not line.startswith("#"))}


def metrics_after(port: int, finished: float) -> dict[str, float]:
    """/metrics once they count `finished` answers (the engine's process reports once a second)."""
    deadline = time.monotonic() + 10
    while (now := metrics(port))["llava_requests_finished_total"] < finished and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def summary(streams: int, runs: list[tuple[float, int, list[float]]]) -> dict:
    """The median round's throughput (the CPU is shared: rounds vary), TTFT percentiles over every round."""
    walls = sorted(runs)
    wall, tokens, _ = walls[len(walls) // 2]
    ttfts = sorted(ttft for _, _, round_ttfts in runs for ttft in round_ttfts)
    return {"streams": streams, "tokens": tokens, "wall": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": statistics.median(ttfts), "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "shapes-llava"))
    # 128: at 8 streams each stream asks 16 times, so the last wave, when fewer streams are left, is a sixteenth of
    # the run, not a quarter (with 32, 16 streams asked twice each: ramp-up and ramp-down only)
    parser.add_argument("--requests", type=int, default=128, help="requests per load level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto", help="llava-serve's --dtype")
    parser.add_argument("--stream-interval", help="llava-serve's --stream-interval (default: its own)")
    parser.add_argument("--single-process", action="store_true", help="llava-serve's --single-process (the model in the server's process)")
    parser.add_argument("--threads", help="llava-serve's --threads")
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "engine.serve_cli", "--model", args.model, "--port", str(port), "--dtype", args.dtype,
                               *(["--stream-interval", args.stream_interval] if args.stream_interval else []),
                               *(["--single-process"] if args.single_process else []), *(["--threads", args.threads] if args.threads else [])],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llava-serve did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        load(client, model, 4, requests(8, "warm-up"), args.max_tokens)
        runs = {streams: [] for streams in args.levels}
        cpu = {streams: {} for streams in args.levels}  # CPU seconds per process over all of a level's rounds
        engine = {streams: {} for streams in args.levels}  # the engine's counters' growth over a level's rounds
        counted = metrics_after(port, 8)
        for round_ in range(args.rounds):  # the levels interleaved, so that a busy minute does not favour one
            for streams in args.levels:
                before = cpu_now(server)
                runs[streams].append(load(client, model, streams, requests(args.requests, f"round {round_}, {streams} streams"), args.max_tokens))
                for name, seconds in cpu_now(server).items():
                    cpu[streams][name] = cpu[streams].get(name, 0.0) + seconds - before[name]
                now = metrics_after(port, counted["llava_requests_finished_total"] + args.requests)
                for name, value in now.items():
                    engine[streams][name] = engine[streams].get(name, 0.0) + value - counted.get(name, 0.0)
                counted = now
        rows = [summary(streams, runs[streams]) for streams in args.levels]
    finally:
        server.terminate()
        server.wait(30)
    base = rows[0]["tokens_per_s"]
    print(f"{args.requests} greedy streamed requests per level and round, at most {args.max_tokens} tokens each, "
          f"model {Path(args.model).name} ({args.dtype}, stream interval {args.stream_interval or 'default'}, "
          f"{'single process' if args.single_process else 'engine process'}, threads {args.threads or 'default'}), median of {args.rounds} rounds")
    print("| streams | completion tokens | wall s | tokens/s | x one at a time | TTFT p50 ms | TTFT p95 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['streams']} | {row['tokens']} | {row['wall']:.2f} | {row['tokens_per_s']:.0f} | {row['tokens_per_s'] / base:.2f} | "
              f"{row['ttft_p50'] * 1000:.0f} | {row['ttft_p95'] * 1000:.0f} |")
    print("\nCPU milliseconds per request (all rounds; the client is this process, its openai threads):")
    print("| streams | " + " | ".join(cpu[args.levels[0]]) + " |")
    print("| --- |" + " --- |" * len(cpu[args.levels[0]]))
    for streams in args.levels:
        requests_made = args.requests * args.rounds
        print(f"| {streams} | " + " | ".join(f"{seconds / requests_made * 1e3:.1f}" for seconds in cpu[streams].values()) + " |")
    print("\nThe engine's counters (/metrics, all rounds): rows per decode step, and per request its riders (prompts fed by a "
          "decode step) and prefilled prompts; the scheduler's thread busy, of the level's wall time:")
    print("| streams | rows per step | riders per request | prefills per request | scheduler busy |")
    print("| --- | --- | --- | --- | --- |")
    for streams in args.levels:
        grown, requests_made = engine[streams], args.requests * args.rounds
        wall = sum(run[0] for run in runs[streams])
        print(f"| {streams} | {grown['llava_decode_rows_total'] / max(1, grown['llava_decode_steps_total']):.2f} | "
              f"{grown['llava_decode_riders_total'] / requests_made:.2f} | {grown['llava_prefill_sequences_total'] / requests_made:.2f} | "
              f"{grown['llava_scheduler_busy_seconds_total'] / wall:.0%} |")


if __name__ == "__main__":
    main()
