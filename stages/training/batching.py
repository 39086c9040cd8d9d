"""Training batches that spend compute only on tokens that teach something.

Two kinds of waste in the usual setup (every example padded to `prompt.max_length`, the full vocabulary
projected at every position) are removed here:

- Padding: a batch is padded only to its longest example, and `train.group_by_length` puts examples of
  similar length together; `train.padding_free` goes further and concatenates the batch into one row
  whose position ids restart at each example, so no pad token is computed at all (transformers builds
  the block-diagonal attention mask from the position ids; flash-attention kernels use it directly).
- The vocabulary projection: with completion-only labels most positions carry no loss, yet the LM head
  (576 x 49,152 for SmolLM2, 4,096 x 128,256 for Llama 3) would map every one of them onto the whole
  vocabulary. `LogitsOnLabels` tells the model, through `logits_to_keep`, to project only the positions
  whose next token is labelled, and `labelled_loss` scores exactly those.

Both give the same loss as the padded, full-vocabulary computation (tests/core/test_batching.py checks it).
"""

from __future__ import annotations

from stages.common.labels import IGNORE_INDEX


def predicts_a_label(labels):
    """Boolean mask (batch, length): True where the next token is labelled, i.e. where a logit is scored."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


class LogitsOnLabels:
    """Wrap a data collator: each batch also carries `logits_to_keep`, the mask from `predicts_a_label`,
    which transformers' causal LMs use to project only those hidden states onto the vocabulary, and
    `use_cache=False`: training needs no key/value cache, and transformers reads packed rows from the position
    ids only when there is none (with one, a padding-free row would attend across its examples)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        batch["logits_to_keep"] = predicts_a_label(batch["labels"])
        batch["use_cache"] = False
        return batch


def labelled_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy of the kept logits against their labels, summed and divided by `num_items_in_batch`
    (the labelled tokens of the whole accumulated batch, as the Trainer counts them) or, without it, by the
    labelled tokens here. Accepts full (batch, length, vocab) logits too, from a model that ignored
    `logits_to_keep`. The Trainer's `compute_loss_func`."""
    import torch.nn.functional as F

    targets_mask = labels[:, 1:] != IGNORE_INDEX
    logits = outputs.logits
    if logits.dim() == 3:
        logits = logits[:, :-1][targets_mask]
    targets = labels[:, 1:][targets_mask]
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    divisor = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    return loss / divisor


def training_collator(tokenizer, padding_free: bool):
    """The collator for train_qlora: padded to the batch's longest example (or concatenated into one
    padding-free row), with `logits_to_keep` for `labelled_loss`."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if padding_free:
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    return LogitsOnLabels(collator)
