"""Sampler role: the vLLM engine wrapper (engine.py) and the sampler main loop."""
