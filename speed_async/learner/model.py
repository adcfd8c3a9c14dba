"""The learner's FSDP2 model: process group, loading, sharding, optimizer, full-state walk, saving.

One code path for CPU and GPU: the device picks the backend (gloo on CPU, nccl on CUDA) and the mesh's
device type; everything else is the same.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from speed_async.config import ModelConfig, OptimConfig
from speed_async.config.dtypes import resolve_dtype


def backend_for(device: torch.device) -> str:
    """The torch.distributed backend for `device`: nccl on CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: torch.device, timeout_s: float | None = None) -> torch.device:
    """Join the default process group (torchrun's env:// variables) unless already joined.

    On CUDA the rank's device becomes cuda:LOCAL_RANK. `timeout_s` bounds every collective of the group
    (None: torch's default). Returns the device this rank computes on.
    """
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(device),
            device_id=device if device.type == "cuda" else None,
            timeout=None if timeout_s is None else timedelta(seconds=timeout_s),
        )
    return device


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of an HF causal LM (`model.model.layers`); ValueError for other layouts."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"model of type {type(model).__name__} has no `model.layers` ModuleList; allowed: HF decoder-only "
            "causal LMs (Qwen2, Llama, ...)"
        )
    return list(layers)


def mixed_precision(train_dtype: str) -> MixedPrecisionPolicy | None:
    """bfloat16 compute with float32 gradient reduction for "bfloat16"; None (plain float32) for "float32".
    `train_dtype` is resolved (no `auto`: see `compute_dtype`)."""
    if train_dtype == "bfloat16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if train_dtype == "float32":
        return None
    raise ValueError(f"model.train_dtype = {train_dtype!r} is invalid: allowed 'float32', 'bfloat16'")


def compute_dtype(model_config: ModelConfig, device: torch.device) -> str:
    """`model.train_dtype` with `auto` resolved for `device` (bfloat16 on CUDA and AMX CPUs, else float32)."""
    return resolve_dtype(model_config.train_dtype, cuda=device.type == "cuda")


def attention_implementation(model_config: ModelConfig, device: torch.device) -> str:
    """`model.attn_implementation` with `auto` resolved: eager on CPU in bfloat16, else sdpa.

    Measured on the 2-core AMX machine (tiny model, 2,048-token micro-batches, one thread): forward + backward in
    bfloat16 took 0.55-0.80x float32's time with eager attention and 0.96-1.9x with SDPA, whose CPU bfloat16
    backward (flash attention) alone took 8x its float32 time.
    """
    if model_config.attn_implementation != "auto":
        return model_config.attn_implementation
    return "eager" if device.type == "cpu" and compute_dtype(model_config, device) == "bfloat16" else "sdpa"


def load_model(model_path: str | Path, model_config: ModelConfig, device: torch.device) -> nn.Module:
    """Load the HF causal LM at `model_path` with float32 master weights and shard it with FSDP2.

    Each decoder layer is its own FSDP unit, then the root (embeddings, final norm, head; tied embeddings
    stay in the root unit), on a 1-D mesh of `device.type` over the default process group (which must be
    initialised). Mixed precision follows `model_config.train_dtype` (see `compute_dtype`, `mixed_precision`), the
    attention `model_config.attn_implementation` (see `attention_implementation`).
    """
    assert dist.is_initialized(), "call init_distributed() before load_model()"
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path), dtype=torch.float32, attn_implementation=attention_implementation(model_config, device)
    )
    model.config.use_cache = False
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, object] = {"mesh": mesh}
    policy = mixed_precision(compute_dtype(model_config, device))
    if policy is not None:
        kwargs["mp_policy"] = policy
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)  # also moves every parameter and buffer to the mesh's device
    return model


def warmup_factor(step: int, warmup_steps: int) -> float:
    """LR multiplier of optimizer step `step` (0-based): (step + 1) / warmup_steps during warm-up, then 1.

    Step warmup_steps - 1 already runs at the full rate; no step runs at 0.
    """
    return 1.0 if step + 1 >= warmup_steps else (step + 1) / warmup_steps


def lr_factor(step: int, optim: OptimConfig, total_steps: int) -> float:
    """LR multiplier of optimizer step `step` (0-based) of `total_steps`: warm-up, then constant, or cosine from 1
    at the end of warm-up to `optim.min_lr_ratio` at step total_steps - 1 (and there after it)."""
    warm = warmup_factor(step, optim.warmup_steps)
    if optim.lr_schedule == "constant" or step + 1 < optim.warmup_steps:
        return warm
    start = max(optim.warmup_steps - 1, 0)
    span = total_steps - 1 - start
    done = 1.0 if span <= 0 else min(1.0, (step - start) / span)
    return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * done))


def build_optimizer(
    model: nn.Module, optim: OptimConfig, total_steps: int = 0
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model's (sharded) parameters and its LambdaLR (`lr_factor`; `total_steps`: optimizer steps
    of the whole run, used by the cosine schedule)."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=(optim.beta1, optim.beta2), weight_decay=optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, optim, total_steps))
    return optimizer, scheduler


def checkpoint_entries(model: nn.Module) -> list[tuple[str, Tensor]]:
    """(name, tensor) of every entry an HF checkpoint of `model` holds, in state-dict order.

    The state dict minus repeats of an already listed tensor: with tied embeddings `lm_head.weight` is the
    same parameter as `model.embed_tokens.weight` and the checkpoint keeps only the first name.
    Non-persistent buffers (rotary tables) are not in the state dict.
    """
    seen: set[int] = set()
    entries = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            entries.append((name, tensor))
    return entries


def iter_full_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """Yield (hf_name, full tensor on CPU) for every checkpoint entry of the FSDP2 `model`.

    Contract: EVERY rank of the default group must iterate this to the end, in lockstep, and must not run any
    other collective (a forward, a broadcast on another group that waits for a peer) between two items:
    each DTensor's `full_tensor()` is an all-gather that every rank joins in the same order. Rank 0 may
    consume each tensor (send it to the samplers) between items; that is why only rank 0's tensors are
    meant to be used. Tensors are fresh CPU copies in the master dtype (float32); names are the HF checkpoint's.
    """
    for name, tensor in checkpoint_entries(model):
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        # A copy: on one rank full_tensor() is the live parameter, which the next optimizer step overwrites.
        yield name, full.detach().to("cpu", copy=True)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """All of `iter_full_state` in one dict (every rank must call it; see that contract)."""
    return dict(iter_full_state(model))


def save_hf(model: nn.Module, tokenizer_dir: str | Path, out_dir: str | Path) -> None:
    """Write `model` (sharded) as an HF directory: config, weights and the tokenizer of `tokenizer_dir`.

    Every rank must call it (the full state is gathered collectively); rank 0 writes `out_dir`.
    """
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        with torch.device("meta"):
            shell = AutoModelForCausalLM.from_config(model.config)
        shell.generation_config = model.generation_config
        shell.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out_dir))
    dist.barrier()
