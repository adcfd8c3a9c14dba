"""Weight sync: the time to publish a new policy version, against a bare gloo broadcast of the same bytes.

One publish, as the learner and a sampler do it, for Qwen2 models from the tiny one (~0.6M parameters) up to
about 100M (random init, the tiny model's vocabulary and tokenizer):

- gather: `iter_full_state` of an FSDP2 model (`load_model` under a 1-rank gloo default group) in this process;
- broadcast: `WeightBroadcaster.send` on a 2-rank `SyncGroup` (sender side: metadata, packing, every bucket;
  a bucket's broadcast also waits for the engine to be ready to take it);
- reload: `Engine.receive_weights` in a real vLLM engine in a second (spawned) process: receive, reload into
  the running model, reset the prefix cache (receiver side, timed by the receiver: the whole call);
- transfer: from the start of `send` to the end of `receive_weights` (one monotonic clock, both processes);
- total publish = gather + transfer (`iter_full_state` yields fresh copies, so the publisher sends them as they
  are, in place for the tensors bigger than a bucket).

The limit ("bare") is a `ProcessGroupGloo` broadcast of buffers of the same sizes (the same bucket plan)
between the same two processes, preallocated on both sides, on a group and store of its own; it is timed
on the sender side like `broadcast`. Ratios: `bandwidth_ratio` = bare s / broadcast s,
`end_to_end_ratio` = bare s / total publish s. Every figure is the median over `--reps` repetitions (after
one warm-up); ours and bare alternate within each repetition so both see the same load. As the launcher
does on CPU, the sender is pinned to the first core and the engine to the rest (with at least 2 cores).

    python benchmarks/weight_sync.py [--quick] [--out benchmarks/results/weight_sync_cpu-2core_<date>.md]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing as mp
import os
import queue
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import emit, machine, print_table

HOST = "127.0.0.1"
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Size:
    """A Qwen2 shape; `name == "tiny"` means the embedded tiny model itself."""

    name: str
    hidden: int = 0
    layers: int = 0
    intermediate: int = 0
    heads: int = 0
    kv_heads: int = 0


SIZES = {
    "tiny": Size("tiny"),
    "3M": Size("3M", hidden=256, layers=4, intermediate=768, heads=4, kv_heads=2),
    "25M": Size("25M", hidden=512, layers=8, intermediate=1536, heads=8, kv_heads=4),
    "100M": Size("100M", hidden=768, layers=12, intermediate=3072, heads=12, kv_heads=4),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def build_model(size: Size, tiny_dir: Path, out_dir: Path) -> Path:
    """A random-init Qwen2 of `size` with the tiny model's vocabulary and tokenizer, saved under `out_dir`."""
    if size.name == "tiny":
        return tiny_dir
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    tiny = AutoConfig.from_pretrained(tiny_dir)
    config = Qwen2Config(
        vocab_size=tiny.vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        head_dim=size.hidden // size.heads,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tiny.bos_token_id,
        eos_token_id=tiny.eos_token_id,
        pad_token_id=tiny.pad_token_id,
    )
    torch.manual_seed(0)
    path = out_dir / f"qwen2-{size.name}"
    Qwen2ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny_dir / name).exists():
            shutil.copy(tiny_dir / name, path / name)
    return path


def _bare_group(port: int, rank: int) -> tuple[dist.ProcessGroupGloo, dist.TCPStore]:
    """A 2-rank gloo group of its own (and the store that must outlive it), outside the project's code."""
    from speed_async.weight_sync.group import connect_store

    store = connect_store(HOST, port, is_master=rank == 0, timeout_s=TIMEOUT_S, what="bare broadcast store")
    return dist.ProcessGroupGloo(dist.PrefixStore("bare/", store), rank, 2, dist.default_pg_timeout), store


def _bare_broadcast(pg: dist.ProcessGroupGloo, buffers: list[torch.Tensor]) -> None:
    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = 0, 0
    for buf in buffers:
        pg.broadcast([buf], opts).wait()


def receiver_main(model_dir: str, sync_port: int, bare_port: int, cmds: mp.Queue, replies: mp.Queue) -> None:
    """The sampler side (spawned): a vLLM engine in the sync group, plus a bare gloo group; serves `cmds`."""
    from speed_async.sampler.engine import Engine

    start = time.monotonic()
    engine = Engine(model_dir, dtype="float32", max_model_len=256, enforce_eager=True)
    replies.put(("ready", time.monotonic() - start))
    try:
        engine.init_weight_sync(HOST, sync_port, 1, 2, "gloo", TIMEOUT_S)
        pg, _store = _bare_group(bare_port, 1)
        buffers: list[torch.Tensor] = []
        while True:
            cmd, arg = cmds.get(timeout=TIMEOUT_S)
            if cmd == "sync":
                replies.put(("go", None))
                seconds = engine.receive_weights(arg)
                replies.put(("synced", (seconds, time.monotonic())))
            elif cmd == "bare":
                if [(b.numel(), str(b.dtype)) for b in buffers] != arg:
                    buffers = [torch.zeros(n, dtype=getattr(torch, dtype.removeprefix("torch."))) for n, dtype in arg]
                replies.put(("go", None))
                _bare_broadcast(pg, buffers)
                replies.put(("bared", time.monotonic()))
            elif cmd == "stop":
                break
            else:
                raise ValueError(f"receiver: unknown command {cmd!r}; allowed: sync, bare, stop")
    finally:
        engine.close()


def _expect(replies: mp.Queue, tag: str, proc: mp.Process) -> Any:
    """The next reply, which must be `tag`; names the dead receiver instead of waiting forever."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            got, value = replies.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"the receiver process exited with code {proc.exitcode} while {tag!r} was awaited"
                ) from None
            continue
        if got != tag:
            raise RuntimeError(f"receiver replied {got!r}, expected {tag!r}")
        return value
    raise TimeoutError(f"no {tag!r} from the receiver within {TIMEOUT_S} s")


def measure(size: Size, model_dir: Path, reps: int, receiver_cores: str | None) -> dict[str, Any]:
    """Every timing of one model size: medians over `reps` repetitions after one warm-up."""
    from speed_async.config import ModelConfig
    from speed_async.learner.model import iter_full_state, load_model
    from speed_async.weight_sync.broadcast import WeightBroadcaster
    from speed_async.weight_sync.buckets import DTYPES, describe, plan_buckets
    from speed_async.weight_sync.group import SyncGroup

    model = load_model(model_dir, ModelConfig(path=str(model_dir)), torch.device("cpu"))
    ctx = mp.get_context("spawn")
    cmds, replies = ctx.Queue(), ctx.Queue()
    sync_port, bare_port = _free_port(), _free_port()
    if receiver_cores:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = receiver_cores
    proc = ctx.Process(target=receiver_main, args=(str(model_dir), sync_port, bare_port, cmds, replies), daemon=True)
    proc.start()
    try:
        engine_start_s = _expect(replies, "ready", proc)
        group = SyncGroup.connect(HOST, sync_port, rank=0, world_size=2, device="cpu", timeout_s=TIMEOUT_S)
        broadcaster = WeightBroadcaster(group)
        pg, _store = _bare_group(bare_port, 0)
        rows: list[dict[str, float]] = []
        layout: list[tuple[int, str]] = []
        buffers: list[torch.Tensor] = []
        for rep in range(reps + 1):
            version = rep + 1
            t0 = time.perf_counter()
            snapshot = list(iter_full_state(model))  # fresh copies, sent as they are (WeightPublisher.publish)
            t1 = time.perf_counter()
            cmds.put(("sync", version))
            _expect(replies, "go", proc)
            send_start = time.monotonic()
            stats = broadcaster.send(snapshot, version)
            reload_s, reload_end = _expect(replies, "synced", proc)
            if not buffers:  # the same bucket plan as the broadcast, preallocated once
                plan = plan_buckets([describe(n, t) for n, t in snapshot], broadcaster.bucket_bytes)
                buffers = [torch.ones(b.numel, dtype=DTYPES[b.dtype]) for b in plan]
                layout = [(b.numel(), str(b.dtype)) for b in buffers]
            del snapshot
            cmds.put(("bare", layout))
            _expect(replies, "go", proc)
            bare_start = time.monotonic()
            _bare_broadcast(pg, buffers)
            bare_s = time.monotonic() - bare_start
            bare_end = _expect(replies, "bared", proc)
            if rep == 0:
                continue  # warm-up
            rows.append(
                {
                    "gather_s": t1 - t0,
                    "broadcast_s": stats.seconds,
                    "reload_s": reload_s,
                    "transfer_s": reload_end - send_start,
                    "bare_s": bare_s,
                    "bare_transfer_s": bare_end - bare_start,
                    "bytes": stats.bytes,
                    "buckets": stats.buckets,
                }
            )
        cmds.put(("stop", None))
        proc.join(timeout=120)
        group.close()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
    params = sum(t.numel() for _, t in iter_full_state(model))
    del model
    med = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    med["total_s"] = statistics.median(r["gather_s"] + r["transfer_s"] for r in rows)
    return {
        "size": size.name,
        "params": params,
        "mb": med["bytes"] / 1e6,
        "buckets": int(med["buckets"]),
        "reps": len(rows),
        "engine_start_s": engine_start_s,
        **{k: v for k, v in med.items() if k not in ("bytes", "buckets")},
        "gbps_ours": med["bytes"] / med["broadcast_s"] / 1e9,
        "gbps_bare": med["bytes"] / med["bare_s"] / 1e9,
        "bandwidth_ratio": med["bare_s"] / med["broadcast_s"],
        "end_to_end_ratio": med["bare_s"] / med["total_s"],
        "s_per_billion_params": med["total_s"] / (params / 1e9),
    }


HEADERS = ["size", "params", "MB", "gather s", "broadcast s", "reload s", "transfer s",
           "total publish s", "bare s", "GB/s ours", "GB/s bare", "bw ratio", "e2e ratio", "s/B params"]  # fmt: skip
KEYS = ["size", "params", "mb", "gather_s", "broadcast_s", "reload_s", "transfer_s", "total_s", "bare_s",
        "gbps_ours", "gbps_bare", "bandwidth_ratio", "end_to_end_ratio", "s_per_billion_params"]  # fmt: skip


def _pin(cores: list[int]) -> tuple[str | None, str | None]:
    """Sender on the first core, engine on the rest (like the launcher's CPU plan); None when < 2 cores."""
    if len(cores) < 2:
        return None, None
    os.sched_setaffinity(0, {cores[0]})
    torch.set_num_threads(1)
    return str(cores[0]), ",".join(map(str, cores[1:]))


def write_markdown(
    path: Path, command: str, info: dict[str, Any], table: str, line: str, uptime: tuple[str, str]
) -> None:
    """The results file: machine, versions, exact command, load, table and the JSON line."""
    text = [
        f"# weight_sync benchmark, {date.today().isoformat()}",
        "",
        "Command (from the repository root):",
        "",
        f"    {command}",
        "",
        f"Load before: `{uptime[0]}`  ",
        f"Load after: `{uptime[1]}`",
        "",
        "Machine and versions:",
        "",
        "```json",
        json.dumps(info, indent=2, sort_keys=True),
        "```",
        "",
        "Medians per size (seconds unless named; see the script's docstring for what each column times):",
        "",
        "```",
        table.rstrip(),
        "```",
        "",
        "JSON line:",
        "",
        "```json",
        line.rstrip(),
        "```",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))


def _uptime() -> str:
    with open("/proc/loadavg") as f:
        return "load average " + " ".join(f.read().split()[:3])


def main() -> None:
    """Parse the arguments, measure every size, print the table and the JSON line (and write `--out`)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="25M only, 3 repetitions (under 3 minutes on 2 cores)")
    parser.add_argument("--sizes", default="tiny,3M,25M,100M", help=f"comma-separated, from {list(SIZES)}")
    parser.add_argument("--reps", type=int, default=5, help="measured repetitions per size (median reported)")
    parser.add_argument("--tiny-dir", type=Path, default=None, help="the tiny model (default: ensure_tiny_model())")
    parser.add_argument("--out", type=Path, default=None, help="also write a results markdown file here")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.reps = "25M", 3
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown or args.reps < 1:
        parser.error(f"--sizes {unknown} unknown (allowed: {list(SIZES)}) or --reps {args.reps} < 1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    command = "python benchmarks/weight_sync.py " + " ".join(sys.argv[1:])
    load_before = _uptime()
    info = machine()  # before pinning, so that it reports every core this run may use
    if args.tiny_dir is None:  # before pinning: a first build trains the tiny model on every core
        from speed_async.tiny import ensure_tiny_model

        args.tiny_dir = Path(ensure_tiny_model())
    tiny_dir = args.tiny_dir
    sender_cores, receiver_cores = _pin(sorted(os.sched_getaffinity(0)))
    from speed_async.learner.model import init_distributed

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": HOST, "MASTER_PORT": str(_free_port())})
    init_distributed(torch.device("cpu"))
    results = []
    workdir = Path(tempfile.mkdtemp(prefix="bench-weight-sync-"))
    try:
        for name in args.sizes.split(","):
            model_dir = build_model(SIZES[name], tiny_dir, workdir)
            results.append(measure(SIZES[name], model_dir, args.reps, receiver_cores))
            print(f"{name}: done ({results[-1]['params'] / 1e6:.2f}M params)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        dist.destroy_process_group()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print(
            f"weight sync publish vs bare gloo broadcast, medians of {args.reps} reps; sender on cores "
            f"{sender_cores or 'all'}, engine on cores {receiver_cores or 'all'}"
        )
        print_table(HEADERS, [[r[k] for k in KEYS] for r in results])
    table = buf.getvalue()
    print(table, end="")
    largest = max(results, key=lambda r: r["params"])
    result = {
        "benchmark": "weight_sync",
        "bandwidth_ratio": largest["bandwidth_ratio"],
        "end_to_end_ratio": largest["end_to_end_ratio"],
        "seconds_per_billion_params": largest["s_per_billion_params"],
        "largest_size": largest["size"],
        "sizes": results,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": info,
    }
    line = io.StringIO()
    with contextlib.redirect_stdout(line):
        emit(result)
    if args.out is not None:
        write_markdown(args.out, command, info, table, line.getvalue(), (load_before, _uptime()))
    emit(result)


if __name__ == "__main__":
    main()
