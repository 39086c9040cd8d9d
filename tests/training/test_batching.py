"""Batches without waste give the same loss and gradients as the padded, full-vocabulary computation."""

from __future__ import annotations

import pytest
import torch

from stages.common.labels import IGNORE_INDEX
from stages.common.modeling import load_tokenizer
from stages.training.batching import labelled_loss, predicts_a_label, training_collator

# Three examples of different lengths, labels on their last tokens only (as completion-only training has).
LENGTHS = (9, 14, 6)
LABELLED = (3, 4, 2)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model, load_tokenizer(tiny_model_dir)


def features(vocab_size: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for length, labelled in zip(LENGTHS, LABELLED, strict=True):
        ids = torch.randint(3, vocab_size, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (length - labelled) + ids[-labelled:]})
    return rows


def reference_loss(model, tokenizer, rows):
    """The usual computation: pad to the longest, project every position, the model's own loss."""
    from transformers import DataCollatorForSeq2Seq

    batch = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)(rows)
    return model(**batch).loss


def wasteless_loss(model, tokenizer, rows, padding_free: bool):
    batch = training_collator(tokenizer, padding_free)(rows)
    labels = batch.pop("labels")
    outputs = model(**batch)
    return labelled_loss(outputs, labels), outputs.logits, batch


def test_the_mask_marks_positions_whose_next_token_is_labelled():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX]])
    assert predicts_a_label(labels).tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize("padding_free", [False, True])
def test_loss_and_gradients_match_the_padded_full_vocabulary_computation(model_and_tokenizer, padding_free):
    model, tokenizer = model_and_tokenizer
    rows = features(model.config.vocab_size)
    model.zero_grad()
    expected = reference_loss(model, tokenizer, rows)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss, logits, batch = wasteless_loss(model, tokenizer, rows, padding_free)
    loss.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Only the labelled positions were projected onto the vocabulary.
    assert logits.shape == (sum(LABELLED), model.config.vocab_size)
    if padding_free:
        assert batch["input_ids"].shape == (1, sum(LENGTHS))
        assert "attention_mask" not in batch  # the packed layout is read from the position ids


def test_the_loss_is_divided_by_the_labelled_tokens_of_the_whole_accumulated_batch(model_and_tokenizer):
    from types import SimpleNamespace

    model, tokenizer = model_and_tokenizer
    rows = features(model.config.vocab_size)
    mean, logits, _ = wasteless_loss(model, tokenizer, rows, padding_free=False)
    labels = training_collator(tokenizer, False)(rows)["labels"]
    summed = labelled_loss(SimpleNamespace(logits=logits), labels, num_items_in_batch=1)
    assert summed.item() == pytest.approx(mean.item() * sum(LABELLED), rel=1e-5)


def test_full_logits_from_a_model_that_ignores_logits_to_keep_give_the_same_loss(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    rows = features(model.config.vocab_size)
    batch = training_collator(tokenizer, False)(rows)
    labels, _ = batch.pop("labels"), batch.pop("logits_to_keep")  # as a model without logits_to_keep
    loss = labelled_loss(model(**batch), labels)
    assert loss.item() == pytest.approx(reference_loss(model, tokenizer, rows).item(), rel=1e-5)
