"""Weight sync: the sync group (group.py), bucket plan (buckets.py), bucketed broadcast (broadcast.py) and the
vLLM worker extension that receives inside the engine (worker_extension.py). No vLLM imports here."""
