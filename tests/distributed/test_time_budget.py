"""trainer.time_budget_s: every learner rank takes rank 0's decision to stop (one broadcast on a real gloo group)."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from speed_async.config import load_config
from speed_async.learner.main import _agree_over_budget

pytestmark = pytest.mark.distributed


@pytest.fixture()
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_budget_stops_after_the_step_that_passes_it(one_rank_group: None) -> None:
    cpu = torch.device("cpu")
    head = SimpleNamespace(t_start=time.time() - 10.0, eval_seconds=0.0)  # rank 0's clock started 10 s ago
    assert _agree_over_budget(head, load_config(None, ["trainer.time_budget_s=5"]), cpu)  # type: ignore[arg-type]
    assert not _agree_over_budget(head, load_config(None, ["trainer.time_budget_s=60"]), cpu)  # type: ignore[arg-type]
    assert not _agree_over_budget(head, load_config(None, []), cpu)  # type: ignore[arg-type]  # 0: no budget
    head.eval_seconds = 6.0  # of those 10 s, the samplers evaluated for 6: 4 s of run time
    assert not _agree_over_budget(head, load_config(None, ["trainer.time_budget_s=5"]), cpu)  # type: ignore[arg-type]
    assert _agree_over_budget(head, load_config(None, ["trainer.time_budget_s=3"]), cpu)  # type: ignore[arg-type]


def test_a_negative_budget_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"trainer.time_budget_s = -1"):
        load_config(None, ["trainer.time_budget_s=-1"])
