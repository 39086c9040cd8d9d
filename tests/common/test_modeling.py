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
