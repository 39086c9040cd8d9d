import pytest

from stages.common.generation import number_complete, parse_price


@pytest.mark.parametrize(
    ("text", "expected"),
    [("99.00", 99.0), (" 1,234.50 dollars", 1234.5), ("about 12", 12.0), ("no idea", None), ("", None)],
)
def test_parse_price(text, expected):
    assert parse_price(text) == expected


@pytest.mark.parametrize(
    ("text", "complete"),
    [
        ("", False),
        ("Price", False),
        ("99", False),
        ("99.", False),
        ("99.00", False),
        ("99.00\n", True),
        ("1.20.", True),
        ("1,234.50 dollars", True),
        ("about 12 ", True),
    ],
)
def test_number_complete(text, complete):
    assert number_complete(text) is complete


def test_single_token_share_and_topk_estimate(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from stages.common.generation import single_token_share, topk_estimates
    from stages.common.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    single = [p for p in range(1, 400) if len(tokenizer(str(p), add_special_tokens=False)["input_ids"]) == 1]
    assert single, "the tiny tokenizer has some whole numbers as single tokens"
    assert single_token_share(tokenizer, [float(single[0])]) == 1.0
    assert single_token_share(tokenizer, [123456789.0]) == 0.0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    estimates = topk_estimates(model, tokenizer, ["Price is $", "A lamp. Price is $"], k=400, batch_size=2)
    assert len(estimates) == 2
    assert all(e is None or e >= 0 for e in estimates)
    assert any(e is not None for e in estimates)  # with k = vocabulary size some top token is a number
