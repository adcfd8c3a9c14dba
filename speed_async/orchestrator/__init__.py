"""The orchestrator: the dispatcher (data cursor, curriculum state, pacing, staleness), sampler membership and
the link to the samplers, the evaluation book, the ledger and their wire conversions.

It runs in learner rank 0's process (a thread of its own) and meets the learner through one narrow call: the
learner asks `Dispatcher.next_batch(step)` for a list of `TrainGroup` and tells it about published versions and
evaluations. The learner imports the orchestrator (only in `speed_async.learner.head`); the orchestrator never
imports the learner, and neither imports the sampler (tests/test_import_layers.py).
"""
