"""LLaVA's scale: load a synthetic 665K-record LLaVA JSON (the size of llava_v1_5_mix665k.json, ~1 GB) and estimate
every record's length, as llava-train does before step 1. Peak memory and time, each in a fresh process, against
json.load of the same file (what any reader that parses the whole list at once pays at least) and against the
code of f14f242 (the whole file read, parsed and kept, every text tokenized) on a tenth of the records.

    python bench/bench_data_scale.py [--records 665000] [--keep FILE]

The file is generated (about 20 s) and deleted afterwards unless --keep names where to write it.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the a of on in with is are there two three people man woman dog cat bus car street table red blue green white "
         "black large small near behind front left right top bottom sitting standing holding wearing looking picture image "
         "scene shows appears which what where how many color kind visible background foreground building window sign "
         "café naïve — “quoted”").split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def generate(path: Path, count: int, seed: int = 0, unique_ids: bool = False):
    """Records shaped like the 665K mixture: ~94% with an image (ids are image ids: records of one image share it),
    1-6 exchanges, answers of up to ~150 words; ~1.6 KB a record, so 665K records make ~1 GB. `unique_ids` for
    f14f242, which refused a repeated id."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as file:
        file.write("[")
        for index in range(count):
            image_id = f"{rng.randrange(120_000):012d}"
            turns = []
            for exchange in range(rng.choice((1, 1, 2, 3, 4, 6))):
                question = sentence(rng, rng.randint(6, 16)) + "?"
                if exchange == 0 and rng.random() < 0.94:
                    question = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
                turns += [{"from": "human", "value": question},
                          {"from": "gpt", "value": " ".join(sentence(rng, rng.randint(8, 20)) for _ in range(rng.randint(1, 9)))}]
            record = {"id": f"{image_id}-{index}" if unique_ids else image_id, "conversations": turns}
            if "<image>" in turns[0]["value"]:
                record["image"] = f"coco/train2017/{image_id}.jpg"
            file.write(("," if index else "") + json.dumps(record, ensure_ascii=False))
        file.write("]")


MEASURE = r"""
import json, resource, sys, time
sys.path[:0] = [{root!r}, {old!r}]
kind, path = sys.argv[1], sys.argv[2]
from transformers import AutoProcessor
import llava_plugin
processor = AutoProcessor.from_pretrained({checkpoint!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if kind == "ours":
    from trainer.sources import load_records
    from trainer.dataset import estimate_lengths
    records = load_records([path], 0)
    lengths = estimate_lengths(records, processor)
elif kind == "f14f242":
    from old_trainer.data import load_records
    from old_trainer.dataset import estimate_lengths
    records = load_records([path], 0)
    lengths = estimate_lengths(records, processor)
else:
    with open(path, encoding="utf-8") as file:
        records = json.load(file)
    lengths = [0] * len(records)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"records": len(records), "seconds": seconds, "peak_mb": peak / 1024, "added_mb": (peak - before) / 1024,
                   "mean_length": sum(lengths) / max(len(lengths), 1)}}))
"""


def old_code(folder: Path) -> Path:
    """trainer/data.py, dataset.py and feature_cache.py as of f14f242, importable as `old_trainer`."""
    package = folder / "old_trainer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("data.py", "dataset.py", "feature_cache.py"):
        source = subprocess.run(["git", "show", f"f14f242:trainer/{name}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        (package / name).write_text(source)
    return folder


def measure(kind: str, path: Path, old: Path) -> dict:
    script = MEASURE.format(root=str(ROOT), old=str(old), checkpoint=str(ROOT / "checkpoints" / "shapes-llava"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "true"}
    result = subprocess.run([sys.executable, "-c", script, kind, str(path)], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"{kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=665_000)
    parser.add_argument("--keep", help="write the generated file here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        path = Path(args.keep) if args.keep else folder / "llava_v1_5_mix665k_synthetic.json"
        tenth = folder / "tenth.json"
        start = time.perf_counter()
        generate(path, args.records)
        generate(tenth, args.records // 10, unique_ids=True)
        print(f"generated {args.records:,} records, {path.stat().st_size / 1e9:.2f} GB, in {time.perf_counter() - start:.0f} s")
        old = old_code(folder)
        rows = {
            "ours": measure("ours", path, old),
            "json.load": measure("json.load", path, old),
            "ours, a tenth": measure("ours", tenth, old),
            "f14f242, a tenth": measure("f14f242", tenth, old),
        }
    print(f"{'':18} {'records':>9} {'seconds':>8} {'peak MB':>8} {'added MB':>9}")
    for name, row in rows.items():
        print(f"{name:18} {row['records']:>9,} {row['seconds']:>8.1f} {row['peak_mb']:>8.0f} {row['added_mb']:>9.0f}")
    ours, baseline = rows["ours"], rows["json.load"]
    print(f"vs json.load: {baseline['added_mb'] / ours['added_mb']:.1f}x less memory added, time ratio {baseline['seconds'] / ours['seconds']:.2f}")
    print(f"vs f14f242 (a tenth): {rows['f14f242, a tenth']['seconds'] / rows['ours, a tenth']['seconds']:.1f}x faster, "
          f"{rows['f14f242, a tenth']['added_mb'] / max(rows['ours, a tenth']['added_mb'], 1):.1f}x less memory added")
    print(f"targets: peak {ours['peak_mb']:.0f} MB < 2048 MB: {ours['peak_mb'] < 2048}; {ours['seconds']:.1f} s < 60 s: {ours['seconds'] < 60}")


if __name__ == "__main__":
    main()
