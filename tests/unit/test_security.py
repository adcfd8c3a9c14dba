"""Security properties of the learner's listening sockets and of the code base.

- Every port the learner listens on (work ROUTER, results PULL, weight-sync TCPStore) is bound to loopback by
  default: read back from the kernel's table of listening sockets (/proc/net/tcp, tcp6), not from our code.
- Binding anywhere else without a shared key is refused before anything listens.
- Nothing in the package or the launcher unpickles or evaluates anything (wire, checkpoints, config).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from speed_async.config import load_config
from speed_async.data.prepare import Prompt
from speed_async.learner.publisher import WeightPublisher
from speed_async.orchestrator.dispatcher import Dispatcher
from speed_async.orchestrator.ledger import Ledger

REPO = Path(__file__).resolve().parents[2]
LISTEN = "0A"
PROMPTS = [Prompt("t", np.arange(1, 3, dtype=np.int32), "1")]


def _listening() -> dict[int, set[str]]:
    """Port -> local addresses of every TCP socket in LISTEN state (IPv4 and IPv6), from /proc/net."""
    out: dict[int, set[str]] = {}
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == LISTEN:
                address, port = local.rsplit(":", 1)
                out.setdefault(int(port, 16), set()).add(address)
    return out


def test_every_port_of_the_learner_listens_on_loopback_only(tmp_path: Path) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp on this system")
    config = load_config(None, ["cluster.num_samplers=1"])
    publisher = WeightPublisher(config, torch.device("cpu"))
    ledger = Ledger(tmp_path)
    dispatcher = Dispatcher(config, PROMPTS, [], ledger, key=None, sync_master=publisher.master, run_dir=tmp_path)
    try:
        ports = {
            "work": int(dispatcher.work_endpoint.rsplit(":", 1)[1]),
            "results": int(dispatcher.results_endpoint.rsplit(":", 1)[1]),
            "sync store": publisher.master[1],
        }
        table = _listening()
        for what, port in ports.items():
            # 127.0.0.1 in /proc/net/tcp is 0100007F (little-endian hex); nothing on 0.0.0.0 or ::.
            assert table.get(port) == {"0100007F"}, f"{what} port {port} listens on {table.get(port)}"
    finally:
        dispatcher.link.close()
        ledger.close()


def test_binding_beyond_loopback_without_a_shared_key_is_refused(tmp_path: Path) -> None:
    config = load_config(None, ["cluster.bind_host=0.0.0.0"])
    with pytest.raises(ValueError, match="requires a shared key"):
        Dispatcher(config, PROMPTS, [], Ledger(tmp_path), key=None, sync_master=("h", 1))


def test_nothing_unpickles_or_evaluates() -> None:
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve"}
    found = []
    for path in [*(REPO / "speed_async").rglob("*.py"), *(REPO / "launcher").rglob("*.py")]:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{path}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in banned_modules]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec"):
                found.append(f"{path}:{node.lineno} calls {node.func.id}")
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                found.append(f"{path}:{node.lineno} calls torch.load")
    assert not found, found
