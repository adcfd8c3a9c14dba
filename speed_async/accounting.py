"""Where every second of an RL step went: the learner's parts and each sampler's activities over the same span.

A step's span runs from the end of the previous step's record to the end of its own (so a checkpoint written
after step s counts in step s + 1). Its learner parts are measured on learner rank 0; `other` is what no part
covers (metrics, Python between parts), so the parts add up to `time/step` exactly. A sampler's activities are
the growth of its cumulative per-activity seconds (`Heartbeat.times`, sampled every heartbeat) between two step
records, scaled to the step's length (`covered_s` says how many seconds of its own clock that was: heartbeats
arrive every half second or so, so a step's sampler split is accurate to about that much).

    step/learner/<part>              seconds of the step, parts in LEARNER_PARTS, then `other`
    step/sampler<i>/<activity>       seconds of the step, activities in SAMPLER_ACTIVITIES
    step/sampler<i>/covered_s        seconds of sampler i's own clock behind that split

No torch: the launcher's final report sums these over a run (`summarize`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from speed_async.protocol import SAMPLER_ACTIVITIES

LEARNER_PARTS = (
    "checkpoint",
    "wait_batch",
    "scatter",
    "plan",
    "pi_old",
    "forward",
    "backward",
    "optimizer",
    "train_other",
    "gather",
    "publish",
)
"""The learner's parts of a step: writing the previous step's checkpoint, waiting for the batch, scattering it
to the ranks, planning micro-batches, pi_old passes (mini-batches after the first), forward, backward,
optimizer, the rest of the train step, gathering the full state, handing it to the publisher."""


def step_split(
    step_s: float,
    learner: Mapping[str, float],
    samplers_now: Mapping[int, np.ndarray],
    samplers_before: Mapping[int, np.ndarray],
) -> dict[str, float]:
    """The `step/...` record of one step of `step_s` seconds from the learner's measured parts (a subset of
    LEARNER_PARTS; missing ones are 0) and each sampler's cumulative activity seconds now and at the previous
    record (a sampler new since then is split from zero)."""
    unknown = set(learner) - set(LEARNER_PARTS)
    assert not unknown, f"unknown learner parts {sorted(unknown)}"
    out = {f"step/learner/{part}": float(learner.get(part, 0.0)) for part in LEARNER_PARTS}
    out["step/learner/other"] = step_s - sum(out.values())
    for sampler_id, now in sorted(samplers_now.items()):
        before = samplers_before.get(sampler_id)
        grown = now - before if before is not None and before.shape == now.shape else now.copy()
        grown = np.maximum(grown, 0.0)  # a restarted sampler's clock starts again from zero
        covered = float(grown.sum())
        for name, value in zip(SAMPLER_ACTIVITIES, grown.tolist(), strict=True):
            out[f"step/sampler{sampler_id}/{name}"] = step_s * value / covered if covered > 0 else 0.0
        out[f"step/sampler{sampler_id}/covered_s"] = covered
    return out


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Over a run's step records: {"learner" or "sampler<i>": {part or activity: total seconds}}; each role's
    totals add up to the run's total step time (a sampler's over the steps it was present in)."""
    totals: dict[str, dict[str, float]] = {}
    for record in records:
        for key, value in record.items():
            if not key.startswith("step/") or key.endswith("/covered_s") or value is None:
                continue
            _, role, part = key.split("/", 2)
            totals.setdefault(role, {}).setdefault(part, 0.0)
            totals[role][part] += float(value)
    return totals


def format_summary(totals: Mapping[str, Mapping[str, float]]) -> list[str]:
    """One line per role: its parts with their share of its time, largest first (parts under 0.5% left out)."""
    lines = []
    for role in sorted(totals, key=lambda r: (r != "learner", r)):
        parts = totals[role]
        whole = sum(parts.values())
        if whole <= 0:
            continue
        shown = sorted(((v, k) for k, v in parts.items() if v / whole >= 0.005), reverse=True)
        lines.append(f"  {role}: " + ", ".join(f"{k} {100 * v / whole:.0f}%" for v, k in shown) + f" of {whole:.0f} s")
    return lines
