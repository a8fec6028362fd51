"""engine.kv_cache: a cache built over tensors holds those very tensors (no copy), answers the model as
transformers' own construction does, and keeps a sliding-window model's layers as transformers builds them."""

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig
from transformers.cache_utils import DynamicLayer

from engine.kv_cache import cache_over

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)


def test_the_tensors_are_shared_and_the_model_answers_the_same():
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        prompt = model(input_ids=ids[:, :6], use_cache=True).cache
        tensors = [(layer.keys.clone(), layer.values.clone()) for layer in prompt.layers]
        ours = cache_over(CONFIG, tensors)
        assert [layer.keys.data_ptr() for layer in ours.layers] == [keys.data_ptr() for keys, _ in tensors]
        assert ours.get_seq_length() == 6 and all(type(layer) is DynamicLayer for layer in ours.layers)
        theirs = DynamicCache(config=CONFIG, ddp_cache_data=[(keys.clone(), values.clone()) for keys, values in tensors])
        step = {"input_ids": ids[:, 6:], "position_ids": torch.tensor([[6], [6]]), "use_cache": True}
        assert torch.equal(model(**step, cache=ours).logits, model(**step, cache=theirs).logits)
    assert torch.equal(ours.layers[0].keys[:, :, :6], tensors[0][0])  # grown by concatenating: the original untouched
    assert ours.layers[0].keys.data_ptr() != tensors[0][0].data_ptr()


def test_a_sliding_window_model_keeps_its_layers():
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
    tensors = [(torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)) for _ in range(2)]
    ours, theirs = cache_over(config, tensors), DynamicCache(config=config, ddp_cache_data=tensors)
    assert [type(layer) for layer in ours.layers] == [type(layer) for layer in theirs.layers]
    assert all(type(layer) is not DynamicLayer for layer in ours.layers)
    assert all(torch.equal(mine.keys, other.keys) for mine, other in zip(ours.layers, theirs.layers))
