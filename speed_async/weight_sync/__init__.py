"""Weight sync: the sync group (group.py), bucket plan (buckets.py) and bucketed broadcast (broadcast.py). The
receiving end inside vLLM is speed_async.sampler.transfer_engine (vLLM's weight-transfer interface). No vLLM
imports here."""
