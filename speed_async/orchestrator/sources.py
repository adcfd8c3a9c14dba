"""Per data source books: how each source screens, trains and scores, for every step record.

Fed by the dispatcher thread (screen results, kept and dropped groups, trained batches, the samplers'
RewardStats), read by the train loop once per step record (`metrics`), under a lock. For every source of the
training data, and any other that reported scores:

    source/<s>/screened      prompts screened so far (SPEED; DAPO and plain groups: groups completed or dropped)
    source/<s>/accept_rate   qualified / screened so far (plain groups: 1; null before the first)
    source/<s>/groups        groups of <s> in this step's batch
    source/<s>/reward_mean   mean reward of their responses (null when the batch has none of <s>)
    reward/<s>/responses     training responses scored so far
    reward/<s>/failed        ... of them whose reward function failed (scored 0), and by kind:
    reward/<s>/failed/<kind> error (raised), invalid (no valid result), timeout
    reward/<s>/score_mean    mean score of the responses scored since the previous step record (null: none)
    reward/<s>/<metric>      mean of each extra metric of the reward function over the same responses

The counts are cumulative and survive a resume (`counts` goes into the checkpoint's counters); the means cover
the span since the previous record.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from speed_async.curriculum.train_group import TrainGroup
from speed_async.protocol import RewardStats
from speed_async.rewards import FAILURE_KINDS

_NAN = float("nan")


class SourceBook:
    """Counts (cumulative, checkpointed) and span sums (since the last `metrics`) per data source."""

    def __init__(self, sources: Iterable[str]) -> None:
        self._sources = sorted(set(sources))
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        """`<source>/<counter>` -> count; restored from a checkpoint."""
        self._batch: dict[str, tuple[int, float]] = {}  # source -> (groups, mean reward) of the last batch
        self._sums: dict[str, dict[str, list[float]]] = {}  # source -> metric -> [sum, count] since `metrics`

    def _known(self, source: str) -> None:
        if source not in self._sources:
            self._sources = sorted({*self._sources, source})

    def screened(self, source: str, accepted: bool) -> None:
        """A prompt of `source` screened (SPEED), or a group completed or dropped for zero variance (DAPO)."""
        with self._lock:
            self._known(source)
            self.counts[f"{source}/screened"] += 1
            self.counts[f"{source}/accepted"] += int(accepted)

    def trained(self, groups: Sequence[TrainGroup]) -> None:
        """The batch of a step."""
        by_source: dict[str, list[TrainGroup]] = {}
        for group in groups:
            by_source.setdefault(group.data_source, []).append(group)
        with self._lock:
            self._batch = {
                s: (len(gs), float(np.mean(np.concatenate([g.rewards for g in gs])))) for s, gs in by_source.items()
            }
            for source in by_source:
                self._known(source)

    def on_reward_stats(self, msg: RewardStats) -> None:
        """A sampler's RewardStats."""
        with self._lock:
            source = msg.data_source
            self._known(source)
            self.counts[f"{source}/responses"] += msg.responses
            for kind in FAILURE_KINDS:
                self.counts[f"{source}/failed/{kind}"] += getattr(msg, f"failed_{kind}")
            sums = self._sums.setdefault(source, {})
            for name, total, count in zip(msg.metric_names, msg.metric_sums, msg.metric_counts, strict=True):
                entry = sums.setdefault(name, [0.0, 0])
                entry[0] += float(total)
                entry[1] += int(count)

    def metrics(self, mode: str) -> dict[str, float]:
        """The per-source fields of a step record (see the module docstring); starts a new span for the means.
        `mode` is curriculum.mode (plain groups accept every prompt)."""
        with self._lock:
            out: dict[str, float] = {}
            for s in self._sources:
                screened = self.counts[f"{s}/screened"]
                accepted = 1.0 if mode == "none" else self.counts[f"{s}/accepted"] / screened if screened else _NAN
                groups, reward = self._batch.get(s, (0, _NAN))
                failed = [self.counts[f"{s}/failed/{kind}"] for kind in FAILURE_KINDS]
                out.update({
                    f"source/{s}/screened": float(screened),
                    f"source/{s}/accept_rate": accepted,
                    f"source/{s}/groups": float(groups),
                    f"source/{s}/reward_mean": reward,
                    f"reward/{s}/responses": float(self.counts[f"{s}/responses"]),
                    f"reward/{s}/failed": float(sum(failed)),
                    **{f"reward/{s}/failed/{kind}": float(n) for kind, n in zip(FAILURE_KINDS, failed, strict=True)},
                })  # fmt: skip
                sums = self._sums.get(s, {})
                score, count = sums.get("score", (0.0, 0))
                out[f"reward/{s}/score_mean"] = score / count if count else _NAN
                for name, (total, n) in sums.items():
                    if name != "score":
                        out[f"reward/{s}/{name}"] = total / n if n else _NAN
            self._sums = {}
            self._batch = {}
            return out
