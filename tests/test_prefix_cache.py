"""The prefix cache's index and the decoded-image store: the longest reusable prefix is found as a scan of every
entry would find it, without comparing a request with every entry; decoded images are found again by their bytes,
within a bound on the pixels held."""

import io
import random

import torch
from PIL import Image
from transformers import DynamicCache, LlamaConfig

from engine import prefix_cache
from engine.decoded_images import DecodedImages
from engine.prefix_cache import PrefixCache, common_prefix
from engine.sessions import Session

IMAGE_TOKEN = 99
CONFIG = LlamaConfig(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, hidden_size=4)


def answered(tokens: list[int], image_key: str) -> Session:
    """A finished one-off answer over `tokens`, with keys and values that say which token they belong to."""
    ids = torch.tensor(tokens)
    values = ids.float()[None, None, :, None].expand(1, 1, len(tokens), 4).clone()
    return Session(image_key=image_key, tokens=ids, cache=DynamicCache(config=CONFIG, ddp_cache_data=[(values, values)]))


def scanned(stored: list[Session], ids: torch.Tensor, image_key: str) -> int:
    """What comparing the request with every stored answer gives (the rule the index must keep)."""
    first_image = int((ids == IMAGE_TOKEN).nonzero()[0]) if (ids == IMAGE_TOKEN).any() else len(ids)
    best = 0
    for session in stored:
        shared = common_prefix(session.tokens, ids)
        best = max(best, shared if session.image_key == image_key else min(shared, first_image))
    return best


def test_the_index_finds_what_a_scan_of_every_entry_finds():
    rng = random.Random(0)
    systems = [[rng.randrange(3, 90) for _ in range(rng.randrange(5, 40))] for _ in range(3)]
    questions = [[rng.randrange(3, 90) for _ in range(rng.randrange(3, 30))] for _ in range(12)]
    cache, stored = PrefixCache(CONFIG, IMAGE_TOKEN, max_tokens=10**9), []
    for step in range(150):
        system, image = rng.choice(systems), rng.choice("abc")
        tokens = system + [IMAGE_TOKEN] * 9 + rng.choice(questions) + [rng.randrange(3, 90) for _ in range(rng.randrange(0, 20))]
        ids = torch.tensor(tokens)
        session = cache.session(image, ids)
        assert session.cached_tokens == scanned(stored, ids, image), step
        if session.cache is not None:  # the cache holds exactly the keys and values of the reused tokens
            assert torch.equal(session.cache.layers[0].keys[0, 0, :, 0], ids[: session.cached_tokens].float())
        stored.append(answered(tokens, image))
        cache.store(stored[-1])


def test_a_full_cache_compares_a_request_with_a_few_entries_not_all(monkeypatch):
    cache = PrefixCache(CONFIG, IMAGE_TOKEN, max_tokens=10**9)
    system = list(range(3, 35))
    for user in range(2000):  # one system prompt, 2,000 different questions
        cache.store(answered(system + [IMAGE_TOKEN] * 9 + [3 + user % 80, 3 + user // 80] * 16, f"image {user}"))
    compared = []
    monkeypatch.setattr(prefix_cache, "common_prefix", lambda cached, ids: compared.append(1) or common_prefix(cached, ids))
    session = cache.session("another image", torch.tensor(system + [IMAGE_TOKEN] * 9 + [5, 6]))
    assert session.cached_tokens == len(system) and len(compared) <= 1


def test_the_bound_holds_and_extended_entries_are_replaced():
    cache = PrefixCache(CONFIG, IMAGE_TOKEN, max_tokens=300)
    base = list(range(3, 3 + 40))
    cache.store(answered(base, "a"))
    cache.store(answered(base + [50] * 30, "a"))  # extends the first: it replaces it
    assert len(cache) == 1 and cache.cached_tokens == 70
    for user in range(20):
        cache.store(answered([3 + user] + base + [60] * 40, "a"))
        assert cache.cached_tokens <= 300
    assert cache.session("a", torch.tensor(base + [50] * 30)).cached_tokens == 0  # the oldest went first
    newest = [3 + 19] + base + [60] * 40
    assert cache.session("a", torch.tensor(newest + [7])).cached_tokens == len(newest)


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return buffer.getvalue()


def test_decoded_images_are_found_by_their_bytes_within_a_pixel_bound():
    store, decodes = DecodedImages(max_pixels=3 * 64 * 48), []

    def decode(data):
        decodes.append(data)
        return Image.open(io.BytesIO(data)).convert("RGB")

    first = store.get(png((255, 0, 0)), decode, lambda image: str(image.getpixel((0, 0))))
    again = store.get(png((255, 0, 0)), decode, lambda image: "never asked")
    assert again is first and len(decodes) == 1 and first[1] == "(255, 0, 0)"
    for shade in range(5):
        store.get(png((0, shade, 0)), decode, str)
    assert len(store) == 3  # three images' pixels at most, the least recently used gone
    store.get(png((255, 0, 0)), decode, str)
    assert len(decodes) == 7  # the red one had gone: decoded again
