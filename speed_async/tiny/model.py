"""A tiny randomly initialised Qwen2 causal LM, the architecture the real runs use, small enough for a CPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

# Head sizes the vLLM CPU attention backend accepts (checked by loading the model in vLLM 0.32 CPU).
SUPPORTED_HEAD_DIMS = (32, 64, 80, 96, 112, 128)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model. Defaults: about 1.2M parameters (8 heads of 32, 4 key/value heads)."""

    hidden_size: int = 256
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of decoder layers."""
    head_dim: int = 32
    """Size of one attention head; `hidden_size` must be a multiple of it."""
    num_kv_heads: int = 4
    """Key/value heads (grouped-query attention); must divide the number of query heads."""
    intermediate_size: int = 512
    """Width of the SwiGLU MLP."""
    max_position_embeddings: int = 512
    """Longest sequence (prompt + response) the model supports."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""

    def __post_init__(self) -> None:
        if self.head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"head_dim={self.head_dim} is not allowed; allowed: {SUPPORTED_HEAD_DIMS}")
        if self.hidden_size % self.head_dim:
            raise ValueError(f"hidden_size={self.hidden_size} must be a multiple of head_dim={self.head_dim}")
        num_heads = self.hidden_size // self.head_dim
        if num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide the {num_heads} attention heads")
        for name in ("num_layers", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is not allowed; allowed: >= 1")


def padded_vocab_size(num_tokens: int, multiple: int = 64) -> int:
    """The embedding rows for `num_tokens` tokens, rounded up to `multiple` (``padded_vocab_size(309) == 320``)."""
    return -(-num_tokens // multiple) * multiple


def tiny_config(spec: TinyModelSpec, *, vocab_size: int, eos_token_id: int, pad_token_id: int) -> Qwen2Config:
    """The transformers `Qwen2Config` for `spec` (float32, tied embeddings, no sliding window)."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.hidden_size // spec.head_dim,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_theta=spec.rope_theta,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )


def build_model(config: Qwen2Config, *, seed: int) -> Qwen2ForCausalLM:
    """A randomly initialised `Qwen2ForCausalLM` for `config`, identical for the same `seed`.

    Its generation config stops at the eos token and samples at temperature 1 by default.
    """
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
    )
    return model


def num_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())
