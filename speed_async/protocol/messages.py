"""The wire messages of speed-async, one frozen dataclass per type; each annotated field line is its schema.

Who sends what:
```
  sampler --Hello, WorkRequest, Heartbeat,          dispatcher   (DEALER -> ROUTER)
            SyncDone, SyncFailed-->
  sampler <--WorkAssignment | NoWork, Rejoin,       dispatcher   (ROUTER -> DEALER)
            ContinueDecision, JoinSyncGroup,
            UpdateWeights, EvalAssignment, Shutdown--
  sampler --ScreenReport, RolloutGroup,             learner      (PUSH -> PULL)
            GroupDropped, EvalResult, RewardStats,
            Heartbeat (its heartbeat thread)-->
```
Ids, epochs, versions and generations are ints >= 0. Version v = the weights after v RL steps.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

import numpy as np

from speed_async.protocol.schema import Array, Bool, Float, Int, Message, Nested, Record, Str, StrList

NonNegInt = Annotated[int, Int(ge=0)]
PosInt = Annotated[int, Int(ge=1)]
Text = Annotated[str, Str()]
Seconds = Annotated[float, Float(ge=0.0)]
TokenIds = Annotated[np.ndarray, Array("<i4", ge=0)]
PromptTokenIds = Annotated[np.ndarray, Array("<i4", min_len=1, ge=0)]
Versions = Annotated[np.ndarray, Array("<i4", min_len=1, ge=0)]
Lengths = Annotated[np.ndarray, Array("<i4", min_len=1, ge=0)]
LogProbs = Annotated[np.ndarray, Array("<f4", finite=True)]
Rewards = Annotated[np.ndarray, Array("<f4", finite=True)]
GroupRewards = Annotated[np.ndarray, Array("<f4", min_len=1, finite=True)]


class Hello(Message, tag="hello"):
    """First message of a sampler on the work channel."""

    sampler_id: NonNegInt
    pid: NonNegInt
    hostname: Text


class WorkRequest(Message, tag="work_request"):
    """A sampler asks for up to ``max_prompts`` new work items; ``version`` is its current policy version."""

    sampler_id: NonNegInt
    version: NonNegInt
    max_prompts: PosInt


class WorkItem(Record):
    """One prompt to generate for (nested in ``WorkAssignment``, never sent alone).

    ``num_screen`` samples are drawn first; if the prompt qualifies, ``num_continue`` more follow
    (``num_continue == 0``: a plain group of ``num_screen`` responses, no screening). ``extra`` is the row's
    other fields as a JSON object (the third argument of a reward function, speed_async.rewards.functions).
    """

    prompt_id: NonNegInt
    epoch: NonNegInt
    data_source: Text
    prompt_token_ids: PromptTokenIds
    ground_truth: Text
    num_screen: PosInt
    num_continue: NonNegInt
    extra: Text = "{}"


class WorkAssignment(Message, tag="work_assignment"):
    """Work for one sampler; ``version`` is the dispatcher's current policy version."""

    items: Annotated[list[WorkItem], Nested(WorkItem, min_len=1)]
    version: NonNegInt


class NoWork(Message, tag="no_work"):
    """Answer to a ``WorkRequest`` when nothing may be handed out now (e.g. the staleness bound)."""

    retry_after_s: Seconds
    reason: Text


class ScreenReport(Message, tag="screen_report"):
    """Screening result of one prompt: its ``num_screen`` rewards and whether it qualified."""

    sampler_id: NonNegInt
    prompt_id: NonNegInt
    epoch: NonNegInt
    version: NonNegInt
    rewards: GroupRewards
    qualified: Annotated[bool, Bool()]


class ContinueDecision(Message, tag="continue_decision"):
    """The dispatcher's answer to a qualified ``ScreenReport``: continue the prompt now (``go``), or drop its
    screen (the prompt is handed out again later, screened afresh): its group would come too late for every step
    it could still be trained at, because enough groups are already ready or being continued for them."""

    prompt_id: NonNegInt
    epoch: NonNegInt
    go: Annotated[bool, Bool()]


@dataclass(frozen=True, eq=False)
class Response:
    """One response of a ``RolloutGroup``: views into its concatenated arrays (not a wire message)."""

    index: int
    token_ids: np.ndarray
    logprobs: np.ndarray
    reward: float
    score: float
    finish_reason: str
    version_min: int
    version_max: int


class RolloutGroup(Message, tag="rollout_group"):
    """A complete group of n responses to one prompt, screening responses first.

    Responses are concatenated: response i is ``response_token_ids[o_i : o_i + response_lengths[i]]``
    with ``o_i = sum(response_lengths[:i])``; ``response_logprobs`` is aligned with the token ids.
    ``scores`` is the correctness before any penalty, ``rewards`` the value trained on.
    ``version_min[i] <= version_max[i]``: the policy versions that generated response i.
    """

    sampler_id: NonNegInt
    prompt_id: NonNegInt
    epoch: NonNegInt
    data_source: Text
    prompt_token_ids: PromptTokenIds
    response_token_ids: TokenIds
    response_lengths: Lengths
    response_logprobs: LogProbs
    rewards: GroupRewards
    scores: GroupRewards
    finish_reasons: Annotated[list[str], StrList()]
    version_min: Versions
    version_max: Versions
    num_screen: PosInt

    def _check_consistency(self) -> None:
        n = len(self.response_lengths)
        total = int(self.response_lengths.sum(dtype=np.int64))
        if len(self.response_token_ids) != total:
            self._bad(
                "response_token_ids",
                f"length {len(self.response_token_ids)} != sum(response_lengths) {total}",
            )
        if len(self.response_logprobs) != total:
            self._bad("response_logprobs", f"length {len(self.response_logprobs)} != sum(response_lengths) {total}")
        for name in ("rewards", "scores", "finish_reasons", "version_min", "version_max"):
            if len(getattr(self, name)) != n:
                self._bad(name, f"length {len(getattr(self, name))} != number of responses {n}")
        if (self.version_min > self.version_max).any():
            self._bad("version_min", "greater than version_max for some response")
        if self.num_screen > n:
            self._bad("num_screen", f"{self.num_screen} > number of responses {n}")

    @property
    def num_responses(self) -> int:
        """n, the number of responses in the group."""
        return len(self.response_lengths)

    @property
    def group_version(self) -> int:
        """The group's policy version: the oldest version that generated any of its responses."""
        return int(self.version_min.min())

    def responses(self) -> Iterator[Response]:
        """The responses in order, as views into the concatenated arrays (no copies)."""
        ends = np.cumsum(self.response_lengths, dtype=np.int64)
        for i, end in enumerate(ends.tolist()):
            start = end - int(self.response_lengths[i])
            yield Response(
                index=i,
                token_ids=self.response_token_ids[start:end],
                logprobs=self.response_logprobs[start:end],
                reward=float(self.rewards[i]),
                score=float(self.scores[i]),
                finish_reason=self.finish_reasons[i],
                version_min=int(self.version_min[i]),
                version_max=int(self.version_max[i]),
            )


class GroupDropped(Message, tag="group_dropped"):
    """A prompt that yields no group (rejected by screening, stale, or failed), with the rewards seen so far."""

    sampler_id: NonNegInt
    prompt_id: NonNegInt
    epoch: NonNegInt
    version: NonNegInt
    reason: Text
    rewards: Rewards


class RewardStats(Message, tag="reward_stats"):
    """What a sampler's reward workers made of one data source's training responses since its previous
    RewardStats for that source: responses scored, failures by kind (the reward function raised, returned no
    valid result, ran past the time limit: each scored 0), and per metric its sum over the responses that
    returned it and their count. Metric "score" (sum of the scores, counted over every response) is always
    there; the others are the reward function's extra metrics."""

    sampler_id: NonNegInt
    data_source: Text
    responses: NonNegInt
    failed_error: NonNegInt
    failed_invalid: NonNegInt
    failed_timeout: NonNegInt
    metric_names: Annotated[list[str], StrList()]
    metric_sums: Annotated[np.ndarray, Array("<f4", finite=True)]
    metric_counts: Annotated[np.ndarray, Array("<i4", ge=0)]

    def _check_consistency(self) -> None:
        for name in ("metric_sums", "metric_counts"):
            if len(getattr(self, name)) != len(self.metric_names):
                self._bad(name, f"length {len(getattr(self, name))} != number of metric names {len(self.metric_names)}")
        if len(set(self.metric_names)) != len(self.metric_names):
            self._bad("metric_names", "names repeat")
        if "score" not in self.metric_names:
            self._bad("metric_names", "no 'score'")
        elif int(self.metric_counts[self.metric_names.index("score")]) != self.responses:
            self._bad("metric_counts", f"the count of 'score' is not responses = {self.responses}")
        failed = self.failed_error + self.failed_invalid + self.failed_timeout
        if failed > self.responses:
            self._bad("responses", f"{self.responses} < failures {failed}")


class JoinSyncGroup(Message, tag="join_sync_group"):
    """Tells a sampler to join weight-sync group ``generation`` at ``master_addr:master_port`` as ``rank``."""

    generation: NonNegInt
    master_addr: Text
    master_port: Annotated[int, Int(ge=1, le=65535)]
    world_size: Annotated[int, Int(ge=2)]
    rank: PosInt
    timeout_s: Annotated[float, Float(gt=0.0)]

    def _check_consistency(self) -> None:
        if self.rank >= self.world_size:
            self._bad("rank", f"{self.rank} not allowed (allowed: 1 .. world_size - 1 = {self.world_size - 1})")


class UpdateWeights(Message, tag="update_weights"):
    """Weights of ``version`` follow on sync group ``generation`` as ``num_buckets`` broadcasts."""

    version: NonNegInt
    generation: NonNegInt
    num_buckets: PosInt


class SyncDone(Message, tag="sync_done"):
    """A sampler loaded the weights of ``version``, taking ``seconds``."""

    sampler_id: NonNegInt
    version: NonNegInt
    seconds: Seconds


SAMPLER_ACTIVITIES = (
    "generating",
    "evaluating",
    "scoring",
    "sending",
    "weights",
    "idle_work",
    "idle_weights",
)
"""What a sampler's main loop can be doing, in the order of ``Heartbeat.times``: running the engine for training
work and for held-out evaluation (one engine step's time split by the sequences of each in it), waiting for
scores with nothing left to run, sending and handling messages, receiving and reloading weights, idle for lack
of work, idle until newer weights allow work (the staleness bound) or arrive."""


class Heartbeat(Message, tag="heartbeat"):
    """Periodic liveness: the sampler's version, its number of pending work items, a state word, and the seconds
    its main loop has spent on each of ``SAMPLER_ACTIVITIES`` since it started (cumulative)."""

    sampler_id: NonNegInt
    version: NonNegInt
    num_pending: NonNegInt
    state: Text
    times: Annotated[np.ndarray, Array("<f8", ge=0.0, finite=True)]

    def _check_consistency(self) -> None:
        if len(self.times) != len(SAMPLER_ACTIVITIES):
            self._bad("times", f"length {len(self.times)} != {len(SAMPLER_ACTIVITIES)} (SAMPLER_ACTIVITIES)")


class SyncFailed(Message, tag="sync_failed"):
    """A sampler could not join weight-sync group ``generation`` or receive ``version`` on it; its weights may
    be incomplete, so it generates nothing until the learner has re-formed the group and re-sent them."""

    sampler_id: NonNegInt
    generation: NonNegInt
    version: NonNegInt
    error: Text


class Rejoin(Message, tag="rejoin"):
    """The learner no longer counts the receiver as a member (declared lost, e.g. after a long stall): drop all
    work, leave the weight-sync group and say ``Hello`` again; ``reason`` is logged."""

    reason: Text


class Shutdown(Message, tag="shutdown"):
    """Asks the receiver to stop; ``reason`` is logged."""

    reason: Text


class EvalAssignment(Message, tag="eval_assignment"):
    """Held-out prompts to evaluate on weights ``version`` (``num_screen`` samples each, never trained on).

    A sampler generates them before it loads any newer weights, so the accuracy is exactly version's.
    """

    items: Annotated[list[WorkItem], Nested(WorkItem, min_len=1)]
    version: NonNegInt


class EvalResult(Message, tag="eval_result"):
    """Scores of one held-out prompt: one correctness score per sample, and the response lengths."""

    sampler_id: NonNegInt
    prompt_id: NonNegInt
    data_source: Text
    version: NonNegInt
    scores: GroupRewards
    response_lengths: Lengths
    seconds: Seconds
    """This prompt's share of the sampler's time on the evaluation (its generate-and-score call / prompts in it)."""

    def _check_consistency(self) -> None:
        if len(self.response_lengths) != len(self.scores):
            self._bad("response_lengths", f"length {len(self.response_lengths)} != number of scores {len(self.scores)}")
