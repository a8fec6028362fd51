"""Training speed, three ratios measured side by side in one run (CPU unless a GPU is present):

1. padding: length/modality-grouped batches vs random batches on a LLaVA-like length mix (no model involved);
2. stage 1 with the vision feature cache vs without (loop samples/s; the one-time cache build is reported apart);
3. llava-train stage 2 vs transformers' Trainer on LlavaForConditionalGeneration: same tiny model shapes, same data
   and preprocessing, same batch size (samples/s of the training loop).

python bench/bench_train.py [--records 256] [--steps 24] [--batch-size 8]
"""

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny_components import save_tokenizer  # noqa: E402
from trainer.batching import GroupedBatchSampler, padding_fraction  # noqa: E402

WORDS = "the a red blue green circle square triangle is at top left right bottom center of image and there are two three".split()


def padding_ratio(seed=0, count=20000, batch_size=16):
    rng = random.Random(seed)
    has_image = [rng.random() < 0.85 for _ in range(count)]
    lengths = [576 + int(rng.lognormvariate(4.5, 0.8)) % 700 if image else 20 + int(rng.lognormvariate(5, 0.9)) % 780
               for image in has_image]
    grouped = padding_fraction(GroupedBatchSampler(lengths, has_image, batch_size, seed).batches(), lengths)
    shuffled = padding_fraction(GroupedBatchSampler(lengths, has_image, batch_size, seed, group_by_length=False).batches(), lengths)
    return grouped, shuffled


def save_parts(folder: Path):
    """A tower and LM big enough that compute, not Python, dominates a CPU step."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    tokenizer = save_tokenizer(folder / "llm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                                 bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)).save_pretrained(folder / "llm")
    CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                                     num_attention_heads=8)).save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(folder / "clip")


def save_data(folder: Path, records: int):
    rng = random.Random(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for index in range(32):
        Image.effect_noise((200 + 7 * index, 150 + 5 * index), 40 + index).convert("RGB").save(folder / "images" / f"{index}.png")
    captions = [{"id": f"c{i}", "image": f"{i % 32}.png", "caption": " ".join(rng.choices(WORDS, k=rng.randint(5, 25)))}
                for i in range(records)]
    instruct = []
    for i in range(records):
        turns = []
        for _ in range(rng.randint(1, 4)):
            turns += [{"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(4, 15)))},
                      {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=int(rng.lognormvariate(3.5, 0.9)) % 300 + 3))}]
        instruct.append({"id": f"i{i}", **({"image": f"{i % 32}.png"} if rng.random() < 0.85 else {}), "conversations": turns})
    (folder / "captions.json").write_text(json.dumps(captions))
    (folder / "instruct.json").write_text(json.dumps(instruct))


def llava_train(*args) -> dict:
    result = subprocess.run([sys.executable, "-m", "trainer.cli", *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    output = Path(args[list(args).index("--output") + 1])
    return json.loads((output / "train_metrics.json").read_text())


def hf_trainer(stage1: Path, folder: Path, steps: int, batch_size: int) -> dict:
    """transformers' own LLaVA with the HF Trainer, on the same weights, data pipeline and batch size."""
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, Trainer, TrainingArguments

    from llava_plugin import LlavaPluginForConditionalGeneration
    from llava_plugin.convert import HF_TO_PLUGIN, rename
    from trainer.batching import Collator
    from trainer.sources import load_records
    from trainer.dataset import LlavaDataset

    ours = LlavaPluginForConditionalGeneration.from_pretrained(stage1)
    processor = AutoProcessor.from_pretrained(stage1)
    config = LlavaConfig(vision_config=ours.config.vision_config.to_dict(), text_config=ours.config.text_config.to_dict(),
                         image_token_index=ours.config.image_token_id, image_seq_length=ours.config.image_seq_length)
    model = LlavaForConditionalGeneration(config)
    model.load_state_dict(rename(ours.state_dict(), [(new, old) for old, new in HF_TO_PLUGIN]), strict=False)
    model.model.vision_tower.requires_grad_(False)
    dataset = LlavaDataset(load_records([str(folder / "instruct.json")], 0), processor, 0, 2048, str(folder / "images"))
    collate = Collator(processor.tokenizer.pad_token_id)

    def collator(items):
        batch = collate(items)
        batch.pop("skipped"), batch.pop("ids")
        return batch

    arguments = TrainingArguments(output_dir=str(folder / "hf"), per_device_train_batch_size=batch_size, max_steps=steps,
                                  learning_rate=2e-5, warmup_steps=0.03, lr_scheduler_type="cosine", save_strategy="no",
                                  report_to=[], logging_steps=10_000, remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
                                  dataloader_num_workers=0, disable_tqdm=True)
    start = time.perf_counter()
    result = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collator).train()
    return {"samples_per_s": result.metrics["train_samples_per_second"], "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    grouped, shuffled = padding_ratio()
    print(f"1. padding on a LLaVA-like mix (20,000 samples, batch 16): grouped {grouped:.1%}, random {shuffled:.1%}")

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        save_parts(folder)
        save_data(folder, args.records)
        common = ["--batch-size", args.batch_size, "--max-steps", args.steps, "--log-every", 1000, "--save-every", 0]
        stage1 = ["--stage", 1, "--vision", folder / "clip", "--llm", folder / "llm", "--data", folder / "captions.json",
                  "--image-folder", folder / "images", "--lr", 1e-3, *common]
        plain = llava_train(*stage1, "--output", folder / "s1")
        start = time.perf_counter()
        cached = llava_train(*stage1, "--output", folder / "s1c", "--cache-vision-features", folder / "features")
        cached_total = time.perf_counter() - start
        print(f"2. stage 1 loop: cached features {cached['samples_per_s']:.2f} samples/s vs tower every step "
              f"{plain['samples_per_s']:.2f}: ratio {cached['samples_per_s'] / plain['samples_per_s']:.2f}x "
              f"(the whole cached run, cache build included, took {cached_total:.1f} s)")

        ours = llava_train("--stage", 2, "--model", folder / "s1", "--data", folder / "instruct.json", "--image-folder",
                           folder / "images", "--output", folder / "s2", "--lr", 2e-5, *common)
        theirs = hf_trainer(folder / "s1", folder, args.steps, args.batch_size)
        print(f"3. stage 2: llava-train {ours['samples_per_s']:.2f} samples/s (padding {ours['padding']:.1%}) vs HF Trainer + "
              f"LlavaForConditionalGeneration {theirs['samples_per_s']:.2f}: ratio {ours['samples_per_s'] / theirs['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()
