"""Checkpoint pieces: ready-group serialization, ledger/metrics tail marking, checkpoint discovery, RNG
states, the --resume config rules, and one save/load round trip of a sharded model on a 1-rank gloo group."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from launcher.train import resume_config
from speed_async.config import load_config, write_resolved_config
from speed_async.curriculum.train_group import TrainGroup
from speed_async.learner.checkpoint import (
    COMPLETE,
    HeadState,
    checkpoint_root,
    decode_group,
    encode_group,
    latest_checkpoint,
    mark_rolled_back,
    pack_head_state,
    remove_incomplete,
    rng_state,
    set_rng_state,
    should_save,
    unpack_head_state,
)
from speed_async.orchestrator.ledger import Ledger, read_ledger


def _group(pid: int, version: int) -> TrainGroup:
    rng = np.random.default_rng(pid)
    responses = [rng.integers(0, 500, size=n).astype(np.int32) for n in (3, 1, 5)]
    return TrainGroup(
        prompt_id=pid,
        epoch=1,
        data_source="arith",
        prompt_token_ids=np.array([1, 2, 70000], dtype=np.int32),
        responses=responses,
        behaviour_logprobs=[-rng.random(len(r)).astype(np.float32) for r in responses],
        rewards=np.array([1.0, 0.0, 0.5], dtype=np.float32),
        version=version,
    )


def _same(a: TrainGroup, b: TrainGroup) -> None:
    assert (a.prompt_id, a.epoch, a.data_source, a.version) == (b.prompt_id, b.epoch, b.data_source, b.version)
    for x, y in [(a.prompt_token_ids, b.prompt_token_ids), (a.rewards, b.rewards)]:
        assert x.dtype == y.dtype and np.array_equal(x, y)
    for xs, ys in [(a.responses, b.responses), (a.behaviour_logprobs, b.behaviour_logprobs)]:
        assert len(xs) == len(ys) and all(
            x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(xs, ys, strict=True)
        )


def test_ready_groups_round_trip_bit_exact() -> None:
    groups = [_group(7, 3), _group(2, 4)]
    for g in groups:
        _same(g, decode_group(encode_group(g)))
    state = HeadState(
        version=5,
        dispatch={"cursor": {"epoch": 1, "position": 3}, "reissue": [[1, 9]], "ready_keys": [[1, 7], [1, 2]]},
        ready=groups,
        counters={"bad_hello": 1},
        ledger_offset=123,
        metrics_offset=45,
        wall_s=6.5,
    )
    back = unpack_head_state(pack_head_state(state))
    assert (back.version, back.dispatch, back.counters) == (5, state.dispatch, {"bad_hello": 1})
    assert (back.ledger_offset, back.metrics_offset, back.wall_s) == (123, 45, 6.5)
    for a, b in zip(groups, back.ready, strict=True):
        _same(a, b)
    # The arrays own their memory (writable), not views of the msgpack buffer.
    assert back.ready[0].responses[0].flags.writeable


def test_corrupt_group_payload_is_named() -> None:
    data = encode_group(_group(1, 0))
    data["behaviour_logprobs"][0] = data["behaviour_logprobs"][0][:4]
    with pytest.raises(ValueError, match=r"behaviour_logprobs\[0\]"):
        decode_group(data)


def test_ledger_tail_marked_rolled_back_and_torn_line_dropped(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.write("dispatched", 1, 0, sampler=0, version=0)
    ledger.write("trained", 1, 0, step=0, lag=0, version=0)
    offset = ledger.offset()
    ledger.write("dispatched", 2, 0, sampler=0, version=1)
    ledger.write("rejected", 2, 0, sampler=0)
    ledger.close()
    path = tmp_path / "ledger.jsonl"
    prefix = path.read_bytes()[:offset]
    with path.open("ab") as f:
        f.write(b'{"event": "dispatched", "prompt_id": 3, "ep')  # a kill in the middle of a line
    assert mark_rolled_back(path, offset) == (2, 1)
    assert path.read_bytes()[:offset] == prefix, "the history up to the checkpoint is kept byte for byte"
    assert [e["prompt_id"] for e in read_ledger(tmp_path)] == [1, 1]
    everything = list(read_ledger(tmp_path, include_rolled_back=True))
    assert [e.get("rolled_back", False) for e in everything] == [False, False, True, True]
    once = path.read_bytes()
    assert mark_rolled_back(path, offset) == (2, 0) and path.read_bytes() == once, "marking is idempotent"
    # A resumed run appends after the marked tail.
    ledger = Ledger(tmp_path, resume=True)
    ledger.write("dispatched", 2, 0, sampler=0, version=1)
    ledger.close()
    assert [e["prompt_id"] for e in read_ledger(tmp_path)] == [1, 1, 2]


def test_mark_rolled_back_rejects_bad_offsets(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n')
    with pytest.raises(ValueError, match="truncated"):
        mark_rolled_back(path, 1000)
    with pytest.raises(ValueError, match="not at the end of a line"):
        mark_rolled_back(path, 5)
    assert mark_rolled_back(path, 12) == (1, 0)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 0},
        {"step": 1, "rolled_back": True},
    ]


def test_only_complete_checkpoints_count(tmp_path: Path) -> None:
    root = checkpoint_root(tmp_path)
    assert latest_checkpoint(tmp_path) is None
    for name, complete in [("step-2", True), ("step-4", True), ("step-6", False), ("tmp-step-8", False)]:
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / COMPLETE).write_text("{}\n")
    assert latest_checkpoint(tmp_path) == (4, root / "step-4")
    assert sorted(p.name for p in remove_incomplete(tmp_path)) == ["step-6", "tmp-step-8"]
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]


def test_should_save() -> None:
    assert [v for v in range(1, 8) if should_save(v, 3, 7)] == [3, 6, 7]
    assert [v for v in range(1, 8) if should_save(v, 0, 7)] == [7]


def test_rng_states_round_trip() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = rng_state()
    want = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(saved)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


def test_resume_config_allows_only_raising_total_steps(tmp_path: Path) -> None:
    write_resolved_config(load_config(None, ["trainer.total_steps=4"]), tmp_path)
    assert resume_config(tmp_path, None, ["trainer.total_steps=9"]).trainer.total_steps == 9
    assert resume_config(tmp_path, None, []).trainer.run_dir == str(tmp_path)
    with pytest.raises(ValueError, match=r"rollout\.n is not allowed with --resume"):
        resume_config(tmp_path, None, ["rollout.n=3"])
    with pytest.raises(ValueError, match="may only be raised"):
        resume_config(tmp_path, None, ["trainer.total_steps=2"])
    with pytest.raises(ValueError, match="--config cannot be combined"):
        resume_config(tmp_path, tmp_path / "x.toml", [])
    with pytest.raises(ValueError, match="does not exist"):
        resume_config(tmp_path / "nope", None, [])


def _save_load_job(rank: int, port: int, run_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from speed_async.learner.checkpoint import load_checkpoint, save_checkpoint

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    try:

        def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
            fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
            optim = torch.optim.AdamW(model.parameters(), lr=0.1)
            return model, optim, torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 4))

        model, optim, sched = build()
        for _ in range(2):
            model(torch.ones(3, 4)).sum().backward()
            optim.step()
            sched.step()
            optim.zero_grad()
        head = HeadState(3, {"ready_keys": []}, [_group(1, 2)], {}, 10, 20, 1.5)
        path = save_checkpoint(run_dir, 3, model, optim, sched, head)
        marker = torch.rand(2)
        model2, optim2, sched2 = build()
        version, back = load_checkpoint(path, model2, optim2, sched2)
        assert version == 3 and back is not None and back.ledger_offset == 10
        _same(back.ready[0], head.ready[0])
        assert torch.equal(torch.rand(2), marker), "the RNG continues from the saved state"
        for a, b in zip(model.parameters(), model2.parameters(), strict=True):
            assert torch.equal(a.full_tensor(), b.full_tensor())
        assert (
            sched2.last_epoch == sched.last_epoch == 2 and optim2.param_groups[0]["lr"] == optim.param_groups[0]["lr"]
        )
        for a, b in zip(model.parameters(), model2.parameters(), strict=True):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(optim.state[a][key].full_tensor(), optim2.state[b][key].full_tensor())
    finally:
        dist.destroy_process_group()


def test_save_and_load_sharded_model_optimizer_scheduler(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_save_load_job, args=(port, str(tmp_path)), nprocs=1, join=True)
    assert (tmp_path / "checkpoints" / "step-3" / COMPLETE).is_file()
    assert not (tmp_path / "checkpoints" / "tmp-step-3").exists()
