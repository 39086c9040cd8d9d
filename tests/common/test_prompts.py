import pytest

from stages.common.labels import IGNORE_INDEX
from stages.common.prompts import encode_example, encode_examples, truncate_prompt

TEMPLATE = "How much does this cost to the nearest dollar?\n\n{text}\n\nPrice is $"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from stages.common.modeling import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_labels_cover_only_the_completion(tokenizer):
    encoded = encode_example(tokenizer, TEMPLATE, "A red lamp.", "42.00", max_length=128, add_eos=True)
    labelled = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled[:-1]) == "42.00"
    assert labelled[-1] == tokenizer.eos_token_id
    prompt_part = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label == IGNORE_INDEX]
    assert tokenizer.decode(prompt_part).endswith("Price is $")
    assert not encoded.truncated


def test_long_description_is_cut_but_completion_and_suffix_survive(tokenizer):
    text = "A very long description of a silver kettle. " * 40
    encoded = encode_example(tokenizer, TEMPLATE, text, "123.00", max_length=90, add_eos=False)
    assert encoded.truncated and len(encoded.input_ids) <= 90
    labelled = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "123.00"
    assert "Price is $" in tokenizer.decode(encoded.input_ids)


def test_generation_prompt_is_cut_to_fit(tokenizer):
    prompt = truncate_prompt(tokenizer, TEMPLATE, "A green drill with many parts. " * 50, 80)
    assert prompt.endswith("Price is $")
    assert len(tokenizer(prompt)["input_ids"]) <= 80


def test_template_longer_than_max_length_keeps_its_ending(tokenizer):
    encoded = encode_example(tokenizer, TEMPLATE, "A lamp.", "7.00", max_length=20, add_eos=False)
    assert len(encoded.input_ids) == 20
    assert tokenizer.decode(encoded.input_ids).endswith("Price is $7.00")


def test_encoding_many_rows_at_once_gives_what_one_at_a_time_gives(tokenizer):
    texts = ["A red lamp.", "A green drill with many parts. " * 30, "Ein Stuhl, 40 cm.", "x"]
    completions = ["42.00", "123.00", "7.50", "1000.00"]
    for max_length, add_eos in ((128, True), (40, False), (12, True)):
        one_by_one = [
            encode_example(tokenizer, TEMPLATE, t, c, max_length, add_eos)
            for t, c in zip(texts, completions, strict=True)
        ]
        assert encode_examples(tokenizer, TEMPLATE, texts, completions, max_length, add_eos) == one_by_one
    assert any(e.truncated for e in one_by_one)
