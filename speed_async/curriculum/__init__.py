"""Curriculum state: SPEED screening/continuation (sampler side), pacing and bookkeeping (dispatcher side)."""
