"""What one process of a multi-process training run needs: its rank, rank-0-only work, and a record of
the examples each process trained on.

Processes are started by `accelerate launch` (stages/training/launcher.py), which sets torchrun's RANK,
WORLD_SIZE and LOCAL_WORLD_SIZE; a single process has none and is rank 0 of 1. The Trainer shards batches
across processes itself; this module only keeps shared files single-writer and reports what each rank saw.
Used by `python -m stages.train_qlora`.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable
from typing import TypeVar

from stages.common.modeling import cores

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def under_fsdp() -> bool:
    """True in a process that `accelerate launch` started with an FSDP config: it sets ACCELERATE_USE_FSDP, which
    the Trainer's Accelerator reads to shard the model (configs/accelerate/fsdp_qlora.yaml)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_main() -> bool:
    """True in the process that writes outputs (rank 0, or the only process)."""
    return rank() == 0


def threads_per_process(threads: int) -> int:
    """CPU threads for torch in this process: `train.threads` when > 0, else the cores shared out among the
    processes on this machine (two processes on 2 cores: one thread each, not two fighting over each core)."""
    if threads > 0:
        return threads
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(cores() // local_processes, 1)


def on_main_then_share(action: Callable[[], T]) -> T:
    """Run `action()` on rank 0 alone while the other ranks wait; return its (picklable) result on every rank.

    Several processes start accelerate's distributed state here (the same one the Trainer uses later:
    gloo on CPUs, NCCL on GPUs) to broadcast the result.
    """
    if world_size() == 1:
        return action()
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    from stages.common.modeling import device

    state = PartialState(cpu=device() == "cpu")
    result = [action() if state.is_main_process else None]
    broadcast_object_list(result, from_process=0)
    return result[0]


def example_digest(input_ids) -> str:
    """A short digest of an example's token ids: the same example gives the same digest on every rank."""
    return hashlib.sha256(",".join(map(str, input_ids)).encode()).hexdigest()[:16]


class SeenExamples:
    """Wraps the Trainer's collator for the training data loader: notes each example it batches (a digest of
    its token ids) and its tokens, then collates as before. Validation batches are not counted."""

    def __init__(self, collator):
        self.collator, self.digests, self.tokens = collator, [], 0

    def __call__(self, features):
        for feature in features:
            self.digests.append(example_digest(feature["input_ids"]))
            self.tokens += len(feature["input_ids"])
        return self.collator(features)


def record_training_examples(trainer) -> SeenExamples:
    """Make `trainer` build its training data loader with a SeenExamples collator; return it to read later."""
    seen = SeenExamples(trainer.data_collator)
    build = trainer.get_train_dataloader

    def get_train_dataloader():
        collator, trainer.data_collator = trainer.data_collator, seen
        try:
            return build()
        finally:
            trainer.data_collator = collator

    trainer.get_train_dataloader = get_train_dataloader
    return seen


def follower_summary(seen: SeenExamples) -> str:
    """What a rank other than 0 reports when it is done (rank 0 reports the stage's result)."""
    return f"rank {rank()} of {world_size()} trained on {len(seen.digests)} examples; rank 0 writes the outputs"


def all_ranks(value):
    """`value` from every rank, in rank order (collective: every rank must call it)."""
    if world_size() == 1:
        return [value]
    import torch.distributed as dist

    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def process_facts(seen: SeenExamples, effective_batch_size: int) -> dict:
    """For metrics/train.json (collective): world size, backend, and per rank the examples (counted with
    repeats and distinct), tokens and a sha256 of its distinct example digests trained on in this session;
    `examples_on_several_ranks` counts the examples more than one rank trained on (0 within one epoch)."""
    distinct = sorted(set(seen.digests))
    mine = {
        "examples": len(seen.digests),
        "distinct_examples": len(distinct),
        "tokens": seen.tokens,
        "examples_sha256": hashlib.sha256("\n".join(distinct).encode()).hexdigest(),
    }
    gathered = all_ranks((mine, distinct))
    ranks_per_example = Counter(digest for _, digests in gathered for digest in digests)
    return {
        "world_size": world_size(),
        "backend": backend(),
        "effective_batch_size": effective_batch_size,
        "examples_on_several_ranks": sum(1 for count in ranks_per_example.values() if count > 1),
        "ranks": {str(r): facts for r, (facts, _) in enumerate(gathered)},
    }


def backend() -> str | None:
    """The torch.distributed backend in use ("gloo", "nccl"), or None for a single process."""
    import torch.distributed as dist

    return dist.get_backend() if dist.is_available() and dist.is_initialized() else None
