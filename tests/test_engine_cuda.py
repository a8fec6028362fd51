"""The engine's CUDA-graph steps (static_slots) on a GPU; skipped elsewhere, so CI never needs one."""

import pytest
import torch

from engine import ChatEngine
from engine.static_slots import StaticSlot
from test_engine import concurrent_users_answer_as_alone, conversation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_graph_replays_answer_as_eager_steps_do(saved_checkpoint):
    graphed = ChatEngine(str(saved_checkpoint), device="cuda")
    eager = ChatEngine(str(saved_checkpoint), device="cuda", static_slots=0)
    replies = conversation(graphed, "alice", max_new_tokens=8)
    assert replies == conversation(eager, "alice", max_new_tokens=8)
    assert conversation(graphed, "alice", max_new_tokens=8) == replies  # again over the captured graphs: undo and regenerate
    slot = graphed.sessions.get("alice").cache
    assert isinstance(slot, StaticSlot) and slot.graphs and all(step.graph is not None for step in slot._steps.values())
    assert 1 in slot._steps and len(slot._steps) >= 2


def test_graph_replays_give_the_logits_of_one_full_forward(saved_checkpoint):
    engine = ChatEngine(str(saved_checkpoint), device="cuda")
    torch.manual_seed(0)
    ids = torch.randint(0, engine.model.config.image_token_id, (1, 40), device="cuda")
    with torch.no_grad():
        reference = engine.model(input_ids=ids).logits[0]
        slot = StaticSlot(engine.model, capacity=42, graphs=True, pool=engine.slots.pool)
        for repeat in range(2):  # captured in the first pass, replayed in the second
            slot.crop(-slot.get_seq_length())
            end = 0
            for size in (17, 1, 3, 9, 10):
                logits = slot.forward(ids[:, end: end + size], {})
                end += size
                torch.testing.assert_close(logits[0], reference[end - 1], atol=2e-4, rtol=2e-4)
    assert sorted(slot._steps) == [1, 4, 16]  # the 17 tokens at 0 would overrun the slot padded to 64: exact


def test_concurrent_users_over_graphed_slots_answer_as_alone(saved_checkpoint):
    """Captures, replays and eager steps of six threads interleave over two slots (the rest in DynamicCaches)."""
    engine = ChatEngine(str(saved_checkpoint), device="cuda", static_slots=2)
    concurrent_users_answer_as_alone(engine)
    assert len(engine.slots) == 2
