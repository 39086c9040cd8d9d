"""train_qlora's helpers: batches, checkpoints, watching callbacks, the planner, multi-process launch."""
