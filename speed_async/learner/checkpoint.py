"""Checkpoints that lose nothing, and the resume that continues the same run directory.

```
 run_dir/checkpoints/
   tmp-step-<S>/            written first (a kill here leaves it incomplete: ignored, removed on resume)
     dcp/                   model + optimizer shards, torch.distributed.checkpoint (every rank writes its own)
     rng-<rank>.msgpack     torch / numpy / python RNG states of each rank
     trainer.msgpack        version S, LR scheduler, world size             (rank 0)
     head.msgpack           dispatcher snapshot: cursor, in-flight keys, accept rate, counters, the ready
                            FIFO with full payloads (raw numpy bytes), ledger and metrics byte offsets (rank 0)
   step-<S>/                barrier, then rank 0 renames tmp-step-<S> and writes `complete` LAST
     complete               only a directory holding it is a checkpoint; resume takes the newest one
```
S is the policy version (weights after S RL steps). On resume, ledger.jsonl and metrics.jsonl keep every byte
up to the saved offsets; each later line stays in the file marked `"rolled_back": true` (a torn last line from
a kill is dropped), so the unmarked lines are the effective history. No pickle anywhere: msgpack only.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from speed_async.curriculum.train_group import TrainGroup

CHECKPOINTS = "checkpoints"
COMPLETE = "complete"
ROLLED_BACK = "rolled_back"
_PREFIX, _TMP_PREFIX = "step-", "tmp-step-"


@dataclass
class HeadState:
    """What learner rank 0 saves besides the shards: the dispatcher's snapshot and the logs' byte offsets."""

    version: int
    """Policy version S of the checkpoint (RL steps done)."""
    dispatch: dict[str, Any]
    """`DispatchState.state_dict()` taken in the dispatcher thread (in-flight keys are in its `reissue`)."""
    ready: list[TrainGroup]
    """Complete groups not yet trained, in FIFO order."""
    counters: dict[str, int]
    """The dispatcher's own counters."""
    ledger_offset: int
    """Bytes of ledger.jsonl at the snapshot (taken in the dispatcher thread, with the state)."""
    metrics_offset: int
    """Bytes of metrics.jsonl after the record of step S - 1."""
    wall_s: float
    """Seconds since the run started (so `time/wall` continues)."""


# ---- locating checkpoints ----------------------------------------------------------------------------------
def checkpoint_root(run_dir: str | Path) -> Path:
    """run_dir/checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def should_save(version: int, save_every: int, total_steps: int) -> bool:
    """Checkpoint after the step that produced `version`: every `save_every` versions and at the last step."""
    return version == total_steps or (save_every > 0 and version % save_every == 0)


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(version, directory) of every COMPLETE checkpoint of the run, oldest first."""
    root = checkpoint_root(run_dir)
    found = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(_PREFIX) and path.name[len(_PREFIX) :].isdigit() and (path / COMPLETE).is_file():
                found.append((int(path.name[len(_PREFIX) :]), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> tuple[int, Path] | None:
    """(version, directory) of the newest complete checkpoint, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete temp directories and step directories without the `complete` marker; returns what was removed."""
    root = checkpoint_root(run_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and (path.name.startswith(_TMP_PREFIX) or not (path / COMPLETE).is_file()):
                shutil.rmtree(path)
                removed.append(path)
    return removed


# ---- ready groups: msgpack + raw little-endian numpy bytes ---------------------------------------------------
def encode_group(group: TrainGroup) -> dict[str, Any]:
    """A TrainGroup as msgpack-ready data (arrays as raw int32 / float32 little-endian bytes)."""

    def raw(array: np.ndarray, dtype: str) -> bytes:
        return np.ascontiguousarray(array, dtype=dtype).tobytes()

    return {
        "prompt_id": int(group.prompt_id),
        "epoch": int(group.epoch),
        "data_source": group.data_source,
        "version": int(group.version),
        "prompt_token_ids": raw(group.prompt_token_ids, "<i4"),
        "responses": [raw(r, "<i4") for r in group.responses],
        "behaviour_logprobs": [raw(lp, "<f4") for lp in group.behaviour_logprobs],
        "rewards": raw(group.rewards, "<f4"),
    }


def decode_group(data: Mapping[str, Any]) -> TrainGroup:
    """Inverse of `encode_group` (TrainGroup validates shapes and dtypes; errors name the field)."""

    def arr(blob: bytes, dtype: str, native: type) -> np.ndarray:
        return np.frombuffer(blob, dtype=dtype).astype(native)

    return TrainGroup(
        prompt_id=int(data["prompt_id"]),
        epoch=int(data["epoch"]),
        data_source=str(data["data_source"]),
        prompt_token_ids=arr(data["prompt_token_ids"], "<i4", np.int32),
        responses=[arr(r, "<i4", np.int32) for r in data["responses"]],
        behaviour_logprobs=[arr(lp, "<f4", np.float32) for lp in data["behaviour_logprobs"]],
        rewards=arr(data["rewards"], "<f4", np.float32),
        version=int(data["version"]),
    )


def pack_head_state(state: HeadState) -> bytes:
    """HeadState -> msgpack bytes."""
    return msgpack.packb(
        {
            "version": state.version,
            "dispatch": state.dispatch,
            "ready": [encode_group(g) for g in state.ready],
            "counters": dict(state.counters),
            "ledger_offset": state.ledger_offset,
            "metrics_offset": state.metrics_offset,
            "wall_s": state.wall_s,
        },
        use_bin_type=True,
    )


def unpack_head_state(blob: bytes) -> HeadState:
    """msgpack bytes -> HeadState."""
    data = msgpack.unpackb(blob, raw=False, strict_map_key=False)
    return HeadState(
        version=int(data["version"]),
        dispatch=data["dispatch"],
        ready=[decode_group(g) for g in data["ready"]],
        counters={str(k): int(v) for k, v in data["counters"].items()},
        ledger_offset=int(data["ledger_offset"]),
        metrics_offset=int(data["metrics_offset"]),
        wall_s=float(data["wall_s"]),
    )


# ---- ledger / metrics tails ----------------------------------------------------------------------------------
def mark_rolled_back(path: str | Path, offset: int) -> tuple[int, int]:
    """Keep `path`'s first `offset` bytes; mark every later JSON line `"rolled_back": true` and drop torn ones.

    The file is rewritten atomically (temp file + rename), so a kill during the rewrite leaves the old or the
    new file; marking twice gives the same file. Returns (lines marked, torn lines dropped). ValueError when
    the file is shorter than `offset` or `offset` is not at a line boundary.
    """
    path = Path(path)
    data = path.read_bytes() if path.exists() else b""
    if len(data) < offset:
        raise ValueError(f"{path} has {len(data)} bytes but the checkpoint recorded {offset}; it was truncated")
    if offset and data[offset - 1 : offset] != b"\n":
        raise ValueError(f"{path}: checkpoint offset {offset} is not at the end of a line")
    marked, torn, out = 0, 0, [data[:offset]]
    for line in data[offset:].split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if not isinstance(record, dict):
            torn += 1
            continue
        record[ROLLED_BACK] = True
        out.append(json.dumps(record).encode() + b"\n")
        marked += 1
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(b"".join(out))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return marked, torn


def effective(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records not marked rolled back (the run's effective history)."""
    return [r for r in records if not r.get(ROLLED_BACK)]


# ---- RNG states ----------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's torch (and CUDA), numpy and python RNG states as msgpack-ready data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().numpy().tobytes(),
        "numpy": [name, np.asarray(keys, dtype="<u4").tobytes(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().numpy().tobytes()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(torch.from_numpy(np.frombuffer(state["torch"], dtype=np.uint8).copy()))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.frombuffer(keys, dtype="<u4").astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.from_numpy(np.frombuffer(state["cuda"], dtype=np.uint8).copy()))


# ---- save / load (collective: every learner rank calls them) ----------------------------------------------
def _write(path: Path, payload: Any) -> None:
    path.write_bytes(msgpack.packb(payload, use_bin_type=True))


def _damaged(path: Path) -> str:
    return (
        f"the checkpoint {path.parent} is damaged; move it out of {path.parent.parent} to resume from the one before it"
    )


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing: {_damaged(path)}")
    try:
        return msgpack.unpackb(path.read_bytes(), raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as err:
        raise ValueError(f"checkpoint file {path} cannot be read ({err}): {_damaged(path)}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    version: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    head: HeadState | None,
) -> Path:
    """Write checkpoint `version` (every rank; `head` on rank 0 only). Returns run_dir/checkpoints/step-<S>.

    Order: rank 0 clears the temp dir; barrier; every rank writes its shards and RNG state, rank 0 the trainer
    and head state; barrier; rank 0 renames the temp dir and writes `complete` last (fsynced).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoint_root(run_dir)
    tmp, final = root / f"{_TMP_PREFIX}{version}", root / f"{_PREFIX}{version}"
    if rank == 0:
        if head is None or head.version != version:
            raise ValueError(f"rank 0 must pass the head state of version {version} to save_checkpoint")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / "dcp"))
    _write(tmp / f"rng-{rank}.msgpack", rng_state())
    if rank == 0:
        assert head is not None
        _write(tmp / "trainer.msgpack", {"version": version, "world_size": world, "scheduler": scheduler.state_dict()})
        (tmp / "head.msgpack").write_bytes(pack_head_state(head))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)  # an incomplete one from a rolled-back history
        os.rename(tmp, final)
        marker = final / f".{COMPLETE}.tmp"  # the marker appears whole or not at all
        with marker.open("w") as f:
            f.write(json.dumps({"version": version, "world_size": world}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker, final / COMPLETE)
        _fsync_dir(final)
        _fsync_dir(root)
    return final


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, HeadState | None]:
    """Restore a complete checkpoint into the (freshly built, sharded) model, optimizer and scheduler and this
    rank's RNG states. Every rank calls it; returns (version, the head state on rank 0 / None elsewhere)."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise ValueError(f"{path} is not a complete checkpoint (no {COMPLETE!r} marker)")
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = _read(path / "trainer.msgpack")
    if int(trainer["world_size"]) != world:
        raise ValueError(
            f"checkpoint {path} was written by {trainer['world_size']} learner ranks; this run has {world} "
            "(cluster.num_learner_ranks must stay the same to resume)"
        )
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(_read(path / f"rng-{rank}.msgpack"))
    head = _read_head(path / "head.msgpack") if rank == 0 else None
    return int(trainer["version"]), head


def _read_head(path: Path) -> HeadState:
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} is missing: {_damaged(path)}")
    try:
        return unpack_head_state(path.read_bytes())
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as err:
        raise ValueError(f"checkpoint file {path} cannot be read ({err!r}): {_damaged(path)}") from None
