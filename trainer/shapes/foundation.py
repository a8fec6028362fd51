"""The "foundation" parts the real method assumes, made for the shapes world: a tiny vision tower trained CLIP-style
with open_clip's contrastive loss on image-caption pairs, and a tiny causal LM (with its own BPE tokenizer) trained
on the world's text. Both are saved in the layouts their real counterparts ship in, so the pipeline loads them
through the same code as pretrained models."""

import json
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from llava_plugin import LlavaPluginImageProcessor

from .settings import TOWER_WIDTH
from .world import SIDES, as_dicts, inventory, make_scene, render, swap_shapes

TOWER = {
    "embed_dim": 64,
    # width: a probe read a thing's shape off its own token 84% / 81% of the time at 128 (seeds 0 / 1), 95% / 77% at
    # 192: wider helps when training breaks through (contrastive loss near 0.3 at the end), and the draw decides that
    "vision_cfg": {"image_size": 96, "patch_size": 32, "width": TOWER_WIDTH, "layers": 4, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
HARD_NEGATIVES = 3  # shape-swapped copies beside each scene in a contrastive batch
LM_PIECES = 4  # forward passes per language-model batch (see train_language_model)


def train_tower(out: Path, steps: int, scenes: int, batch_size: int, seed: int, negatives: int = HARD_NEGATIVES,
                position_embedding_norm: float = 0.0, width: int = TOWER["vision_cfg"]["width"]) -> Path:
    """open_clip CLIP on (image, caption) pairs of freshly drawn scenes; saved as an open_clip local-dir model.

    Each batch holds groups of one scene and `negatives` copies of it with shapes swapped, captioned with every
    thing's colour, shape and place. Random batches can be told apart by colour and place alone, and a tower
    trained on them forgets shape (a per-patch probe read shape worse than from a random tower); the swapped copies
    make shape the only way to match their captions.

    open_clip starts the position embedding at a norm near 1, against about 13 for a patch's content, and the patch
    tokens then lose where they are (a per-token probe read the cell 24% of the time). `position_embedding_norm`
    (0: open_clip's start) rescales it before training: from 13, the probe reads the cell 100%, but the shape 82% against 92%
    at width 128; `width` 192 gave shape 95% with seed 0 (77% with seed 1)."""
    import open_clip
    from open_clip.loss import ClipLoss

    config = {**TOWER, "vision_cfg": {**TOWER["vision_cfg"], "width": width}}
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config)
    if position_embedding_norm:
        with torch.no_grad():
            embedding = model.visual.positional_embedding
            embedding.mul_(position_embedding_norm / embedding.norm(dim=-1, keepdim=True).mean())
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=TOWER["text_cfg"]["context_length"])
    processor = LlavaPluginImageProcessor(image_aspect="pad", image_size=TOWER["vision_cfg"]["image_size"], image_mean=MEAN, image_std=STD)
    rng = random.Random(f"{seed}:tower")
    groups, pixels = [], []
    for _ in tqdm(range(scenes), desc="tower: scenes"):
        side = rng.choice(SIDES)
        scene = make_scene(rng, side)
        group = [scene] + [swap_shapes(scene, rng) for _ in range(negatives)]
        groups.append([inventory(as_dicts(things)) for things in group])
        # float16 keeps the pool small (scenes x groups of 96 px images); the step casts back.
        pixels.append(torch.cat([processor(render(things, side), return_tensors="pt")["pixel_values"] for things in group]).half())
    loss_fn, optimizer = ClipLoss(), torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=steps // 10, num_training_steps=steps)
    per_batch = max(batch_size // (1 + negatives), 2)
    model.train()
    bar = tqdm(range(steps), desc="tower: contrastive")
    for _ in bar:
        chosen = rng.sample(range(scenes), min(per_batch, scenes))
        images = torch.cat([pixels[index] for index in chosen]).float()
        texts = tokenizer([caption for index in chosen for caption in groups[index]])
        image_features, text_features, scale = model(images, texts)
        loss = loss_fn(image_features, text_features, scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {"mean": MEAN, "std": STD}}))
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


def train_language_model(texts: list[str], out: Path, steps: int, batch_size: int, seed: int) -> Path:
    """A BPE tokenizer and a small LLaMA trained on the world's text; saved as a transformers causal LM."""
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1200, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    ids = [tokenizer(text + tokenizer.eos_token)["input_ids"] for text in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=steps // 10, num_training_steps=steps)
    rng = random.Random(seed)
    model.train()
    bar = tqdm(range(steps), desc="language model")
    for _ in bar:
        batch = sorted((ids[rng.randrange(len(ids))][:256] for _ in range(batch_size)), key=len)
        # The texts run from a few tokens to 140 (mean 21): padded to the batch's longest, 79% of the tokens computed
        # were padding. The same batch in four length-sorted pieces computes 38% as many tokens (45% of them padding),
        # for the same loss: each piece's mean weighted by its share of the predicted tokens (n tokens predict n - 1).
        predicted = sum(len(sample) - 1 for sample in batch)
        optimizer.zero_grad()
        loss = 0.0
        size = -(-len(batch) // LM_PIECES)
        for start in range(0, len(batch), size):
            piece = batch[start:start + size]
            longest = max(map(len, piece))
            input_ids = torch.full((len(piece), longest), tokenizer.eos_token_id)
            labels = torch.full((len(piece), longest), -100)
            for row, sample in enumerate(piece):
                input_ids[row, :len(sample)] = torch.tensor(sample)
                labels[row, :len(sample)] = torch.tensor(sample)
            share = sum(len(sample) - 1 for sample in piece) / predicted
            piece_loss = model(input_ids=input_ids, labels=labels).loss * share
            piece_loss.backward()
            loss += piece_loss.item()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss:.3f}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
