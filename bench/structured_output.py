"""What a structured output costs: the same requests with and without a JSON schema, in the same run.

python bench/structured_output.py [--streams 8] [--requests 64] [--tokens 32] [--vocabulary 32000] [--steps 200]

1. The engine in-process (the embedded shapes model, its 752-token vocabulary), `--streams` request threads
   answering bench_serve's requests greedily, every answer `--tokens` long: plain (through its end tokens,
   ignore_eos), then held to a JSON schema whose string field is too long to end sooner (baseline: plain).
   Completion tokens/s.
2. The draw alone at a real vocabulary: `next_tokens` for a batch of `--streams` rows of random scores over
   `--vocabulary` tokens (a byte-level BPE tokenizer trained here on the installed packages' Python sources, as
   no hub tokenizer can be fetched), plain against every row held to a schema, each row's matcher inside a JSON
   string (where most tokens are allowed: the mask's costliest state). Microseconds per step, and the ratio.
   The grammar's compilation at that vocabulary is timed too (paid once per spec: it is kept)."""

import argparse
import glob
import json
import statistics
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

from bench_serve import requests  # noqa: E402
from engine import ChatEngine  # noqa: E402
from engine.decoding import Sampling, next_tokens  # noqa: E402
from engine.media import MediaPolicy  # noqa: E402
from engine.openai_api import engine_messages, parse_request  # noqa: E402
from engine.structured_output import Grammars, Structure  # noqa: E402

SCHEMA = {"type": "object", "properties": {"shape": {"type": "string", "enum": ["circle", "square", "triangle"]},
                                           "color": {"type": "string", "enum": ["red", "blue", "green", "yellow", "purple"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "note": {"type": "string", "minLength": 400, "maxLength": 800}},
          "required": ["shape", "color", "count", "note"], "additionalProperties": False}


def engine_tokens_per_second(engine: ChatEngine, conversations: list, streams: int, tokens: int,
                             structure: Structure | None) -> tuple[float, int]:
    """(completion tokens/s, tokens) of every conversation answered greedily over `streams` threads, `tokens` each."""
    sampling = Sampling(temperature=0, max_new_tokens=tokens, structure=structure, ignore_eos=structure is None)
    total, lock, queue = [0], threading.Lock(), list(reversed(conversations))

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                messages, images = queue.pop()
            for progress in engine.generate(messages, images, sampling):
                pass
            with lock:
                total[0] += progress.completion_tokens

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total[0] / (time.perf_counter() - start), total[0]


def trained_tokenizer(size: int, folder: Path):
    """A byte-level BPE tokenizer of `size` tokens, trained on the installed packages' Python sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for path in sorted(glob.glob(str(Path(sysconfig.get_paths()["purelib"]) / "**" / "*.py"), recursive=True))[:6000]:
            try:
                yield Path(path).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>", "<s>", "</s>"],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", bos_token="<s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def draw_microseconds(tokenizer, rows: int, steps: int) -> tuple[float, float, float]:
    """(plain, constrained microseconds per next_tokens step, compile ms) for `rows` rows over the tokenizer's vocabulary."""
    vocabulary = len(tokenizer)
    grammars = Grammars(tokenizer, vocabulary, [tokenizer.eos_token_id])
    structure = Structure("json_schema", json.dumps(SCHEMA), any_whitespace=False)
    start = time.perf_counter()
    grammars.constraint(structure)
    compile_ms = (time.perf_counter() - start) * 1e3
    prefix = tokenizer('{"shape": "circle", "color": "red", "count": 3, "note": "')["input_ids"]
    constraints = []
    for _ in range(rows):
        constraint = grammars.constraint(structure)
        for token in prefix:
            assert constraint.accept(token), tokenizer.decode([token])
        constraints.append(constraint)
    samplings, generators = [Sampling(temperature=0)] * rows, [None] * rows
    logits = torch.randn(rows, vocabulary)

    def per_step(held) -> float:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            next_tokens(logits, samplings, generators, [], None, None, held)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    plain, held = [], []
    for _ in range(3):  # interleaved
        plain.append(per_step(None))
        held.append(per_step(constraints))
    return statistics.median(plain), statistics.median(held), compile_ms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "checkpoints" / "shapes-llava"))
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--vocabulary", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)

    engine = ChatEngine(args.model, device="cpu")
    policy = MediaPolicy()
    conversations = [engine_messages(parse_request(json.dumps({"model": "m", "messages": messages}).encode()), policy)
                     for messages in requests(args.requests, "structured")]
    structure = Structure("json_schema", json.dumps(SCHEMA), any_whitespace=False)
    engine_tokens_per_second(engine, conversations[:8], args.streams, args.tokens, structure)  # warm-up: the grammar compiled, caches made
    rounds = {"plain": [], "schema": []}
    for _ in range(2):
        rounds["plain"].append(engine_tokens_per_second(engine, conversations, args.streams, args.tokens, None))
        rounds["schema"].append(engine_tokens_per_second(engine, conversations, args.streams, args.tokens, structure))
    plain = statistics.median(rate for rate, _ in rounds["plain"])
    held = statistics.median(rate for rate, _ in rounds["schema"])
    print(f"engine, {args.streams} streams, {args.requests} requests: plain {plain:.1f} tokens/s "
          f"({rounds['plain'][0][1]} tokens), schema {held:.1f} tokens/s ({rounds['schema'][0][1]} tokens): "
          f"{held / plain:.2f}x plain")

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        tokenizer = trained_tokenizer(args.vocabulary, Path(folder))
        print(f"tokenizer of {len(tokenizer)} tokens trained in {time.perf_counter() - start:.1f} s")
        plain_us, held_us, compile_ms = draw_microseconds(tokenizer, args.streams, args.steps)
    print(f"draw of {args.streams} rows over {len(tokenizer)} tokens: plain {plain_us:.0f} us, every row held to the "
          f"schema {held_us:.0f} us ({held_us / plain_us:.2f}x; {(held_us - plain_us) / args.streams:.0f} us per row); "
          f"the schema compiled in {compile_ms:.1f} ms")


if __name__ == "__main__":
    main()
