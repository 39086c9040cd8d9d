"""modeling: the 4-bit config, plain and for training under FSDP (4-bit weights stored in the compute dtype, the
model loaded in that dtype too), built and loaded on the CPU."""

import pytest

from stages.common import modeling
from stages.common.config import params_from_dict


def quantization(compute_dtype: str = "auto"):
    return params_from_dict({"quantization": {"compute_dtype": compute_dtype}}).quantization


def test_4_bit_weights_are_stored_in_uint8_by_default():
    import torch

    config = modeling.bnb_config(quantization("bfloat16"))
    assert config.bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant


@pytest.mark.parametrize(
    ("device", "compute_dtype", "expected"),
    [
        ("cuda", "auto", "bfloat16"),
        ("cpu", "auto", "float32"),
        ("cuda", "float16", "float16"),
        ("cpu", "bfloat16", "bfloat16"),
    ],
)
def test_under_fsdp_4_bit_weights_are_stored_in_the_compute_dtype(monkeypatch, device, compute_dtype, expected):
    import torch

    monkeypatch.setattr(modeling, "device", lambda: device)
    config = modeling.bnb_config(quantization(compute_dtype), sharded=True)
    assert config.bnb_4bit_quant_storage == config.bnb_4bit_compute_dtype == getattr(torch, expected)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_a_base_loaded_for_fsdp_holds_one_float_dtype_and_computes_the_same(tiny_model_dir, compute_dtype):
    """Every parameter, the packed 4-bit weights included, has the compute dtype (what FSDP needs to shard them
    with the rest), and the logits are those of the base stored in uint8."""
    import bitsandbytes as bnb
    import torch

    cfg = quantization(compute_dtype)
    plain, sharded = modeling.load_base(tiny_model_dir, cfg), modeling.load_base(tiny_model_dir, cfg, sharded=True)
    dtype = getattr(torch, compute_dtype)
    assert {p.dtype for p in sharded.parameters()} == {dtype}
    assert isinstance(sharded.model.layers[0].self_attn.q_proj.weight, bnb.nn.Params4bit)
    assert torch.uint8 in {p.dtype for p in plain.parameters()}
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, sharded(input_ids=ids).logits)


def random_adapter(base, folder):
    """A LoRA adapter on every attention and MLP projection of `base`, with random (non-zero) A and B, saved in
    `folder`: so the answers depend on both the base's weights and the adapter's."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def answers_of(model, tokenizer, prompts):
    """Greedy continuations of `prompts` as evaluation generates them, and the logits of the last position."""
    import torch

    from stages.common.config import EvaluateConfig
    from stages.common.generation import generate

    cfg = EvaluateConfig(batch_size=4, max_new_tokens=6)
    texts = generate(model, tokenizer, prompts, cfg, "check", stop_at_number=False)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return texts, model(**batch).logits[:, -1]


def assert_dequantized_answers_as_4_bit(base_dir, tmp_path, prompts):
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    tokenizer = modeling.load_tokenizer(base_dir)
    cfg = quantization()
    four_bit = modeling.load_adapter_model(base_dir, adapter, cfg)
    dequantized = modeling.load_adapter_model(base_dir, adapter, cfg, dequantize_on_cpu=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in four_bit.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in dequantized.modules())
    texts, logits = answers_of(four_bit, tokenizer, prompts)
    texts_dequantized, logits_dequantized = answers_of(dequantized, tokenizer, prompts)
    assert texts_dequantized == texts
    assert torch.equal(logits_dequantized, logits)
    return texts


PROMPTS = [
    "How much does this cost to the nearest dollar?\n\nA ring, gold\n\nPrice is $",
    "How much does this cost?\n\nLoose diamond, 0.31 carat, Ideal cut, colour E\n\nPrice is $",
    "Price is $",
    "A chair of oak and leather, made by hand in a small workshop; price",
    "x",
]


def test_the_dequantized_base_answers_as_the_4_bit_one(tiny_model_dir, tmp_path):
    """Same greedy texts and bit-identical logits, with the LoRA layers unmerged on plain Linear layers."""
    assert_dequantized_answers_as_4_bit(tiny_model_dir, tmp_path, PROMPTS)


@pytest.mark.slow
def test_the_dequantized_embedded_base_answers_as_the_4_bit_one(tmp_path):
    from serving.pricer import embedded_base

    texts = assert_dequantized_answers_as_4_bit(embedded_base(), tmp_path, PROMPTS)
    assert any(t.strip() for t in texts)


def test_dequantizing_is_skipped_when_the_weights_would_not_fit(tiny_model_dir, monkeypatch, capsys):
    import bitsandbytes as bnb
    import psutil

    model = modeling.load_base(tiny_model_dir, quantization())
    free = type("Free", (), {"available": modeling.dequantized_bytes(model)})
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    assert not modeling.dequantize_linear4bit(model)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert "keeping the base in 4 bits" in capsys.readouterr().out
