"""A lean decoding loop over a KV cache: one forward per token and nothing else per step, so the session's cache
stays in our hands (no copy, no worker thread) and Python overhead stays below transformers' generate."""

from collections.abc import Callable, Iterator

import torch
from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper


def logits_processors(temperature: float, top_p: float, suppress: list[int], device) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if suppress:
        processors.append(SuppressTokensLogitsProcessor(suppress, device=device))
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    return processors


@torch.no_grad()
def decode(step: Callable[[torch.Tensor, dict], torch.Tensor], ids: torch.Tensor, keep: int, max_new_tokens: int,
           temperature: float, top_p: float, stop_ids: set[int], suppress: list[int], lock, **image_inputs) -> Iterator[int]:
    """Yields new token ids. `ids` (1, T) is the whole prompt; the first `keep` of it are already in the cache that
    `step(new_ids, image_inputs)` extends, returning the logits (1, vocab) of the last new token."""
    processors = logits_processors(temperature, top_p, suppress, ids.device)
    step_ids, sequence = ids[:, keep:], ids
    for _ in range(max_new_tokens):
        with lock:  # steps of different sessions interleave; each forward has the model to itself
            logits = step(step_ids, image_inputs)
        image_inputs = {}  # the image entered the cache with the prompt
        scores = processors(sequence, logits.float())
        if temperature > 0:
            token = torch.multinomial(torch.softmax(scores, dim=-1), 1)
        else:
            token = scores.argmax(dim=-1, keepdim=True)
        token_id = int(token)
        if token_id in stop_ids:
            return
        yield token_id
        step_ids, sequence = token, torch.cat([sequence, token], dim=1)
