"""The learner: FSDP2 model and optimizer, token-budget micro-batching, the RL train step, batch scatter.

`batch` is pure numpy/torch packing; `model` owns every FSDP2 call (sharding, full-state walk, saving);
`train_step` holds the `Learner`; `scatter` broadcasts rank 0's groups to the other learner ranks.
"""
