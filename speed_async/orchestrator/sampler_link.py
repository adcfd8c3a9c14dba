"""The learner's end of the sampler channels: its two bound sockets, who the senders are, and what was refused.

Used by the dispatcher thread only (ZeroMQ sockets belong to one thread); `members` is thread-safe.

- Receiving: the work ROUTER (control messages, answered) and the results PULL (streamed results and the
  samplers' heartbeats). Invalid frames are dropped and counted by the sockets; a valid message whose sender
  is not a live member is counted as `unknown_sender` and, on the work channel, answered: `Rejoin` to a
  sampler the learner lost (or never knew), `Shutdown` to an older process of a sampler id that a newer one
  has taken over.
- Sending: a send that finds the peer gone declares that sampler lost (through `on_gone`); one that finds it
  not reading is counted and skipped (its liveness timeout decides).
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from speed_async.config import Config
from speed_async.orchestrator.membership import EVENTS_FILE, EventLog, Membership, SamplerInfo
from speed_async.protocol import REASONS, Hello, JoinSyncGroup, Message, Rejoin, Shutdown
from speed_async.transport import HANDSHAKE, Context, PullSocket, RouterSocket, TransportError, TransportTimeout

log = logging.getLogger("speed_async.dispatcher")
SEND_TIMEOUT_S = 0.2
REJECTION_KINDS = (*sorted(REASONS), HANDSHAKE, "unknown_sender", "bad_group")
"""Keys of `transport/rejected/<kind>` in metrics.jsonl: protocol errors by reason, failed ZeroMQ handshakes,
valid messages from a sender that is not a live member, and groups of the wrong size."""


class SamplerLink:
    """Sockets + membership + rejection counters of the dispatcher thread."""

    def __init__(
        self,
        config: Config,
        *,
        key: bytes | None,
        on_gone: Callable[[int, str], None],
        run_dir: Path | None = None,
        resume: bool = False,
    ) -> None:
        self.ctx = Context()
        max_bytes = config.pipeline.max_message_bytes
        self.router = RouterSocket(self.ctx, key=key, max_bytes=max_bytes)
        self.pull = PullSocket(self.ctx, key=key, max_bytes=max_bytes)
        host, port = config.cluster.bind_host, config.cluster.base_port
        self.work_endpoint = self.router.bind_endpoint(host, port)
        self.results_endpoint = self.pull.bind_endpoint(host, port + 1 if port else 0)
        events = EventLog(run_dir / EVENTS_FILE if run_dir is not None else None, resume=resume)
        self.members = Membership(config.cluster.num_samplers, events)
        self.on_gone = on_gone
        self.counters: Counter[str] = Counter()

    # ---- sending -----------------------------------------------------------------------------------------
    def send(self, info: SamplerInfo, msg: Message) -> bool:
        """Send to one sampler; True if it went out."""
        try:
            self.router.send_to(info.identity, msg, timeout_s=SEND_TIMEOUT_S)
            return True
        except TransportTimeout:
            self.counters["send_timeouts"] += 1
            log.warning("%s does not read its work channel; %s not sent", info.describe(), msg.TAG)
        except TransportError:
            self.on_gone(info.sampler_id, "its connection to the work socket is gone")
        return False

    def send_to(self, sampler_id: int, msg: Message) -> bool:
        """Send to the live sampler `sampler_id`; False if it is not alive or the send failed."""
        info = self.members.get(sampler_id)
        return info is not None and info.alive and self.send(info, msg)

    def reply(self, identity: bytes, msg: Message) -> None:
        """Best-effort answer to a peer that is not a live member."""
        with contextlib.suppress(TransportError):
            self.router.send_to(identity, msg, timeout_s=SEND_TIMEOUT_S)

    def send_join(self, generation: int, members: Sequence[int], master: tuple[str, int], timeout_s: float) -> None:
        """Ask `members` (ranks 1.. in this order) to join weight-sync group `generation` at `master`."""
        for rank, sampler_id in enumerate(members, start=1):
            msg = JoinSyncGroup(
                generation=generation,
                master_addr=master[0],
                master_port=master[1],
                world_size=len(members) + 1,
                rank=rank,
                timeout_s=timeout_s,
            )
            self.send_to(sampler_id, msg)

    # ---- receiving ---------------------------------------------------------------------------------------
    def control_sender(self, identity: bytes, msg: Message) -> SamplerInfo | None:
        """The live member that sent control message `msg` (not a Hello) from `identity`; None otherwise
        (counted, and answered with Rejoin or Shutdown when the message names a sampler)."""
        sampler_id = getattr(msg, "sampler_id", None)
        info = self.members.get(sampler_id) if sampler_id is not None else None
        if info is not None and info.identity == identity and info.alive:
            return info
        self.counters["unknown_sender"] += 1
        if sampler_id is None or isinstance(msg, Hello):
            return None
        if info is not None and info.identity != identity:
            self.reply(identity, Shutdown(reason=f"this sampler id now belongs to {info.describe()}"))
        else:  # lost (e.g. after a long stall), or never seen by this learner
            self.reply(identity, Rejoin(reason=f"the learner does not count sampler {sampler_id} as alive"))
        return None

    def hello(self, identity: bytes, msg: Hello, required_version: int) -> None:
        """A sampler says hello: it joins (an older live process of its id is declared lost first); it gets no
        work before it holds weights `required_version`. A hello for an id outside the cluster is refused."""
        if msg.sampler_id >= self.members.num_samplers:
            self.counters["unknown_sender"] += 1
            log.warning("hello from sampler id %d outside the configured range", msg.sampler_id)
            return
        old = self.members.get(msg.sampler_id)
        if old is not None and old.alive:
            if old.identity == identity:
                return  # a repeated hello of the same process
            self.on_gone(msg.sampler_id, f"replaced by a new process (pid {msg.pid} on {msg.hostname})")
        info = self.members.join(identity, msg.sampler_id, msg.pid, msg.hostname, required_version)
        what = (info.describe(), info.incarnation, required_version)
        log.info("%s joined (incarnation %d); work once it holds version %d", *what)

    def result_sender(self, sampler_id: int, **fields: Any) -> SamplerInfo | None:
        """The live member `sampler_id`, its liveness refreshed; None (counted) if it is not one."""
        info = self.members.touch(sampler_id, **fields)
        if info is None:
            self.counters["unknown_sender"] += 1
        return info

    def transport_metrics(self) -> dict[str, float]:
        """`transport/rejected/<kind>` for every kind and their sum `transport/rejected_messages`."""
        counts = self.router.rejected + self.pull.rejected
        counts.update({k: self.counters[k] for k in ("unknown_sender", "bad_group")})
        out = {f"transport/rejected/{kind}": float(counts[kind]) for kind in REJECTION_KINDS}
        out["transport/rejected_messages"] = float(sum(counts[kind] for kind in REJECTION_KINDS))
        return out

    def close(self) -> None:
        """Close the sockets and the membership log."""
        self.router.close()
        self.pull.close()
        self.ctx.close()
        self.members.close()
