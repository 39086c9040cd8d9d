"""The planner's peak training memory: its arithmetic on a small Llama, and its activation term against what
autograd really saves."""

from __future__ import annotations

import pytest
import torch

from stages.common.config import params_from_dict
from stages.training.planner import RUNTIME_OVERHEAD_BYTES, plan_for_config, plan_text

# hidden 64, MLP 128, 4 heads of 16 (2 key/value heads), vocabulary 100, lm_head untied.
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "tie_word_embeddings": False,
}
# LoRA r=8 with dropout on q, k, v, o (the default targets); batches of 2 rows x 10 tokens.
PARAMS = {"lora": {"r": 8, "dropout": 0.1}, "train": {"batch_size": 2}, "prompt": {"max_length": 10}}


def small_config(layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(**SMALL, num_hidden_layers=layers)


@pytest.fixture(autouse=True)
def on_a_cpu(monkeypatch):
    """Plan as on a CPU, where dropout's mask is float32 (on CUDA it is a 1-byte bool)."""
    monkeypatch.setattr("stages.common.modeling.device", lambda: "cpu")


def test_counts_and_weights_of_a_small_llama():
    p = plan_for_config(small_config(), params_from_dict(PARAMS))
    # embed 100x64 + lm_head 100x64 + 2 layers x (q 64x64, k 64x32, v 64x32, o 64x64, MLP 3x64x128, 2 norms of 64)
    # + the final norm.
    assert p.base_parameters == 6_400 + 6_400 + 2 * (4_096 + 2_048 + 2_048 + 4_096 + 24_576 + 128) + 64 == 86_848
    assert p.quantized_weights == 2 * (12_288 + 24_576) == 73_728  # every linear layer but lm_head
    assert p.largest_quantized_weight == 64 * 128
    assert p.trainable == 2 * (8 * (64 + 64) + 8 * (64 + 32) * 2 + 8 * (64 + 64)) == 7_168


def test_peak_memory_of_a_small_llama_in_qlora():
    m = plan_for_config(small_config(), params_from_dict(PARAMS)).memory
    assert (m.quantized, m.rows, m.length, m.checkpointing, m.scored_positions) == (True, 2, 10, False, 20)
    # 73,728 weights at 4 + 8/64 + 32/(64 x 256) bits = 38,034 bytes; 13,120 other parameters in float32.
    assert m.base_weights == pytest.approx(38_034 + 52_480)
    assert m.adapter_state == 7_168 * 16  # adapter, gradient, two AdamW moments: float32 each
    # Per token and layer: 4 x [2 x (64 + 1) norms + 4 x 64 attention + 4 heads' logsumexp + a 10-token mask row
    # + 3 x 128 MLP] = 3,136; each of 4 LoRA modules (input 64, r 8): dropout's output and float mask, lora_A's
    # output = 4 x (64 + 8) + 4 x 64 = 544. (3,136 + 4 x 544) x 2 layers x 20 tokens:
    assert m.activations == (3_136 + 4 * 544) * 2 * 20 == 212_480
    assert m.logits == 20 * 100 * 4 * 3  # every position, vocabulary 100, float32, three copies
    assert m.dequantized_weight == 64 * 128 * 4
    assert m.runtime == RUNTIME_OVERHEAD_BYTES
    assert m.total == pytest.approx(90_514 + 114_688 + 212_480 + 24_000 + 32_768 + RUNTIME_OVERHEAD_BYTES)


def test_lora_on_the_full_precision_base_keeps_every_weight_in_float32():
    p = plan_for_config(small_config(), params_from_dict({**PARAMS, "quantization": {"load_in_4bit": False}}))
    m = p.memory
    assert m.base_weights == 86_848 * 4 and m.dequantized_weight == 0
    assert m.activations == 212_480  # the same saved tensors


def test_gradient_checkpointing_keeps_each_layer_input_and_one_layer():
    train = {"batch_size": 2, "gradient_checkpointing": True}
    m = plan_for_config(small_config(), params_from_dict({**PARAMS, "train": train})).memory
    assert m.checkpointing
    assert m.activations == 20 * (2 * 64 * 4 + 3_136 + 4 * 544)  # 2 layer inputs + one layer recomputed
    lora = {**PARAMS, "train": train, "quantization": {"load_in_4bit": False}}
    assert not plan_for_config(small_config(), params_from_dict(lora)).memory.checkpointing  # peft: 4-bit only


def test_padding_free_rows_are_one_row_of_the_whole_batch():
    m = plan_for_config(
        small_config(), params_from_dict({**PARAMS, "train": {"batch_size": 2, "padding_free": True}})
    ).memory
    assert (m.rows, m.length) == (1, 20)
    assert m.activations == (3_136 + 4 * 10 + 4 * 544) * 2 * 20  # its mask row is 20 tokens long


def test_without_dropout_lora_keeps_its_input_and_output():
    m = plan_for_config(small_config(), params_from_dict({**PARAMS, "lora": {"r": 8, "dropout": 0.0}})).memory
    assert m.activations == (3_136 + 4 * 4 * (64 + 8)) * 2 * 20


def test_plan_text_prints_the_estimate_part_by_part():
    text = plan_text(plan_for_config(small_config(), params_from_dict(PARAMS), "a test config"))
    assert "peak training memory: ~" in text and "(QLoRA, NF4 base, 2 x 10 tokens, gradient checkpointing off)" in text
    assert "20 positions x 100 x 4 bytes x 3 (every position: an upper bound)" in text
    for part in ("base weights", "adapter state", "activations", "logits", "dequantized", "runtime"):
        assert f"\n  {part} " in text


def saved_activation_bytes(layers: int, params, quantized: bool) -> int:
    """Bytes autograd keeps after one forward pass of the small Llama with LoRA attached as train_qlora does, on
    2 padded rows of 10 tokens: distinct storages, parameters left out (they are the weights, not new memory)."""
    import dataclasses

    from transformers import LlamaForCausalLM

    from stages.common.modeling import base_loading_kwargs
    from stages.train_qlora import attach_lora

    torch.manual_seed(0)
    config = small_config(layers)
    quantization = dataclasses.replace(params.quantization, load_in_4bit=quantized)
    weights = LlamaForCausalLM(config).state_dict()
    base = LlamaForCausalLM.from_pretrained(
        None, config=config, state_dict=weights, **base_loading_kwargs(quantization)
    )
    model = attach_lora(base, params.lora, params.train.gradient_checkpointing)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padded, as train_qlora's batches are
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):  # what the forward pass keeps
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(saved.values())


@pytest.mark.parametrize(("quantized", "checkpointing"), [(False, False), (True, False), (True, True)])
def test_activations_per_layer_match_what_autograd_saves(quantized, checkpointing):
    train = {"batch_size": 2, "gradient_checkpointing": checkpointing}
    params = params_from_dict({**PARAMS, "quantization": {"load_in_4bit": quantized}, "train": train})
    measured = saved_activation_bytes(3, params, quantized) - saved_activation_bytes(2, params, quantized)
    planned = plan_for_config(small_config(3), params).memory.activations
    planned -= plan_for_config(small_config(2), params).memory.activations
    assert measured == pytest.approx(planned)  # exact: a torch or transformers that saves more shows here
