"""The typed config tree: one frozen dataclass per section, a docstring per field. The sections of what is
generated and trained are here; those of how a run runs (pipeline, cluster, trainer, logging) in
`speed_async.config.runtime`.

Validation that concerns one section lives in that section's `__post_init__`; rules that span sections live in
`Config.__post_init__`. Every error is a `ValueError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from speed_async.config.runtime import ClusterConfig, LoggingConfig, PipelineConfig, TrainerConfig
from speed_async.config.runtime import require as _require

FUNCTION_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")
"""What `reward.functions` values look like: ``package.module:function``."""
INSTRUCTION_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


@dataclass(frozen=True)
class ModelConfig:
    path: str = "builtin:tiny"
    """A Hugging Face model directory, `builtin:tiny` for the embedded tiny Qwen2 model, or `builtin:tiny-long` for
    it warm-started further on the long-tail sums task (both shipped in the package, checked by sha256)."""
    train_dtype: Literal["auto", "float32", "bfloat16"] = "float32"
    """Learner compute dtype: bfloat16 is FSDP2 mixed precision (float32 master weights and gradient reduction).
    `auto`: bfloat16 on CUDA and on CPUs with native bfloat16 (AMX), else float32 (speed_async/config/dtypes.py).
    The shipped configs say `auto`; float32 keeps the learner's log-probs exact (the parity tests use it)."""
    engine_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """vLLM engine dtype; `auto` as for `train_dtype` (bfloat16 on CUDA and on AMX CPUs, else float32). float32
    keeps behaviour log-probs closest to a float32 learner's."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = "auto"
    """The learner's attention (transformers' `attn_implementation`). `auto`: eager on CPU in bfloat16 (SDPA's
    CPU bfloat16 backward took 8x its float32 time, measured), else sdpa."""


@dataclass(frozen=True)
class DataConfig:
    train_files: tuple[str, ...] = ("builtin:arithmetic/train",)
    """Training prompt sources: `.jsonl` ({problem, answer}), VeRL `.parquet`, `builtin:arithmetic/<split>`, or
    `builtin:sums/<split>` (the long-tail task)."""
    eval_files: tuple[str, ...] = ("builtin:arithmetic/test",)
    """Held-out sources evaluated every `trainer.eval_every` steps, reported per data source."""
    train_batch_size: int = 16
    """Complete groups (prompts) per RL step (paper: 16)."""
    max_prompt_length: int = 128
    """Prompt length limit in tokens; longer prompts are handled by `on_overlong_prompt`, never truncated."""
    on_overlong_prompt: Literal["error", "skip"] = "error"
    """`error` stops before training and names the row; `skip` drops the prompt and reports it."""
    on_bad_row: Literal["error", "skip"] = "error"
    """`error` stops on a malformed row naming file, row and field; `skip` counts and reports it."""
    chat_template: bool = False
    """Render prompts with the tokenizer's chat template (paper: on for Qwen2.5-Math)."""
    prompt_suffix: str = INSTRUCTION_SUFFIX
    """Appended to every problem (the paper's instruction)."""
    shuffle: bool = True
    """Shuffle the training prompts each epoch, deterministically by `trainer.seed` and epoch."""

    def __post_init__(self) -> None:
        _require(len(self.train_files) > 0, "data.train_files", self.train_files, "at least one source")
        _require(self.train_batch_size >= 1, "data.train_batch_size", self.train_batch_size, "must be >= 1")
        _require(self.max_prompt_length >= 1, "data.max_prompt_length", self.max_prompt_length, "must be >= 1")


@dataclass(frozen=True)
class RolloutConfig:
    n: int = 4
    """Samples per prompt in the first generation call: SPEED's screening size n_init (paper: 4), or the whole
    group size for the base algorithms and DAPO (paper baselines: 24)."""
    n_continue: int = 20
    """SPEED only: additional samples for a prompt that qualified (paper: 20); its group is n + n_continue."""
    gen_batch_size: int = 64
    """Most new prompts a sampler screens at once (paper: 64 per generation call): it asks the dispatcher for
    more as screens finish; continuations of qualified prompts start as soon as their screen is scored."""
    temperature: float = 1.0
    """Sampling temperature (paper: 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold (paper: 1.0)."""
    max_response_length: int = 64
    """Maximum generated tokens per response (paper: 3072)."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take (GPU only)."""
    enforce_eager: bool = False
    """Skip vLLM's torch.compile / CUDA graphs: starts much faster (seconds on CPU), generates slower."""
    max_num_seqs: int = 0
    """Sequences the engine runs per step (vLLM's max_num_seqs; 0: vLLM's default, 256 on CPU). The sampler keeps
    this many requests in flight when the dispatcher has work for it."""
    weight_update_mode: Literal["keep", "wait", "abort"] = "wait"
    """What requests in flight do when new weights arrive: `wait` (the default, fastest in
    benchmarks/update_modes.py): no new requests until those in flight finish, then load; `keep`: pause, load,
    resume: they continue under the new weights (their KV recomputed; each response records the oldest and
    newest version that generated it); `abort`: drop them (the prompts go back to the dispatcher, ledger
    `reissued`), then load. Work that the bound already rules out is dropped in every mode."""

    def __post_init__(self) -> None:
        _require(self.n >= 1, "rollout.n", self.n, "must be >= 1")
        _require(self.max_num_seqs >= 0, "rollout.max_num_seqs", self.max_num_seqs, "must be >= 0 (0: vLLM's default)")
        _require(self.n_continue >= 0, "rollout.n_continue", self.n_continue, "must be >= 0")
        _require(self.gen_batch_size >= 1, "rollout.gen_batch_size", self.gen_batch_size, "must be >= 1")
        _require(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0")
        _require(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]")
        _require(self.max_response_length >= 1, "rollout.max_response_length", self.max_response_length, ">= 1")
        _require(
            0 < self.gpu_memory_utilization <= 1,
            "rollout.gpu_memory_utilization",
            self.gpu_memory_utilization,
            "must be in (0, 1]",
        )


@dataclass(frozen=True)
class CurriculumConfig:
    mode: Literal["speed", "none", "dapo"] = "speed"
    """`speed`: screen with rollout.n, continue qualified prompts with rollout.n_continue; `none`: plain groups of
    rollout.n (RLOO/GRPO); `dapo`: groups of rollout.n, zero-variance groups dropped (DAPO dynamic sampling)."""
    pass_rate_low: float = 0.0
    """SPEED qualifies a prompt iff pass_rate_low < screening pass rate < pass_rate_high (paper: 0 and 1)."""
    pass_rate_high: float = 1.0
    """Upper end of the open qualification band."""

    def __post_init__(self) -> None:
        _require(0 <= self.pass_rate_low < 1, "curriculum.pass_rate_low", self.pass_rate_low, "must be in [0, 1)")
        _require(
            self.pass_rate_low < self.pass_rate_high <= 1,
            "curriculum.pass_rate_high",
            self.pass_rate_high,
            f"must be in (pass_rate_low={self.pass_rate_low}, 1]",
        )


@dataclass(frozen=True)
class RewardConfig:
    functions: dict[str, str] = field(default_factory=dict)
    """Reward function per data source, `source = "package.module:function"` ([reward.functions] in TOML,
    `reward.functions.<source>=module:function` on the command line); sources not named use their builtin
    function (`countdown`: speed_async.rewards.countdown:score_countdown) or Math-Verify. A function takes
    (response, ground_truth, extra: the row's other fields) and returns a float, or a dict with `score` and
    named extra metrics (reward/<source>/<name> in metrics.jsonl). It runs in the reward worker processes under
    pipeline.reward_timeout_s; raising, a non-number, NaN or infinity, or the time limit score 0 and are
    counted per source. The launcher imports each one (from the working directory or PYTHONPATH) before
    anything starts."""

    def __post_init__(self) -> None:
        for source, path in self.functions.items():
            key = f"reward.functions.{source}"
            _require(bool(source.strip()), key, path, "the data source name must not be empty")
            _require(isinstance(path, str) and bool(FUNCTION_PATH.match(path)), key, path, "expected 'module:function'")


@dataclass(frozen=True)
class AlgorithmConfig:
    advantage: Literal["rloo", "grpo"] = "rloo"
    """Group-relative advantage: RLOO (leave-one-out, no std) or GRPO (std-normalised; the DAPO runs)."""
    clip_low: float = 0.2
    """PPO clip: ratio lower bound 1 - clip_low."""
    clip_high: float = 0.2
    """PPO clip: ratio upper bound 1 + clip_high (DAPO clip-higher: 0.28)."""
    clip_c: float = 10.0
    """Dual-clip constant for negative advantages (> 1)."""
    kl_coef: float = 0.0
    """Coefficient of the low-variance (k3) KL to the initial model; 0 disables the reference model."""
    off_policy_correction: Literal["none", "tis", "mis", "icepop"] = "none"
    """Weights of the response tokens from rho = pi_old / pi_behaviour (the samplers' log-probs):
    `tis`: min(rho, tis_cap) per token; `mis`: per response the geometric mean g of its tokens' rho, weight g
    when mis_low <= g <= mis_high, else the whole response is masked (0); `icepop`: rho per token when
    icepop_low <= rho <= icepop_high, else that token is masked. Masked tokens still count in the token mean."""
    tis_cap: float = 2.0
    """Truncation cap C of the TIS weights (>= 1)."""
    mis_low: float = 0.8
    """MIS: lower end of the band of the geometric-mean sequence ratio (in (0, 1])."""
    mis_high: float = 1.25
    """MIS: upper end of the band of the geometric-mean sequence ratio (>= 1)."""
    icepop_low: float = 0.5
    """IcePop: lower end of the per-token ratio band (in (0, 1]; IcePop's paper: 0.5)."""
    icepop_high: float = 5.0
    """IcePop: upper end of the per-token ratio band (>= 1; IcePop's paper: 5)."""
    overlong_buffer: int = 0
    """DAPO overlong soft penalty buffer in tokens (paper: 512 of 3072); 0 disables the penalty."""
    mini_batch_size: int = 16
    """Groups per optimizer step; train_batch_size / mini_batch_size optimizer steps per RL step, for every
    algorithm alike."""
    micro_batch_tokens: int = 8192
    """Token budget of one forward/backward micro-batch on one learner rank."""

    def __post_init__(self) -> None:
        _require(self.clip_low >= 0, "algorithm.clip_low", self.clip_low, "must be >= 0")
        _require(self.clip_high >= 0, "algorithm.clip_high", self.clip_high, "must be >= 0")
        _require(self.clip_c > 1, "algorithm.clip_c", self.clip_c, "must be > 1")
        _require(self.kl_coef >= 0, "algorithm.kl_coef", self.kl_coef, "must be >= 0")
        _require(self.tis_cap >= 1, "algorithm.tis_cap", self.tis_cap, "must be >= 1")
        for band in ("mis", "icepop"):
            low, high = getattr(self, f"{band}_low"), getattr(self, f"{band}_high")
            _require(0 < low <= 1, f"algorithm.{band}_low", low, "must be in (0, 1]")
            _require(high >= 1, f"algorithm.{band}_high", high, "must be >= 1")
        _require(self.overlong_buffer >= 0, "algorithm.overlong_buffer", self.overlong_buffer, "must be >= 0")
        _require(self.mini_batch_size >= 1, "algorithm.mini_batch_size", self.mini_batch_size, "must be >= 1")
        _require(self.micro_batch_tokens >= 1, "algorithm.micro_batch_tokens", self.micro_batch_tokens, ">= 1")


LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-6
    """AdamW learning rate, constant after warm-up (paper: 1e-6)."""
    warmup_steps: int = 10
    """Linear warm-up in optimizer steps (paper: 10)."""
    weight_decay: float = 0.1
    """AdamW weight decay (paper: 0.1)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (paper: 1.0); 0 disables it."""
    lr_schedule: str = "constant"
    """After warm-up: "constant" (paper) or "cosine" (from lr down to lr * min_lr_ratio at the last of
    trainer.total_steps; a run that stops earlier, e.g. on trainer.time_budget_s, stops part way down)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule's final learning rate as a fraction of lr."""

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _require(
            self.lr_schedule in LR_SCHEDULES, "optim.lr_schedule", self.lr_schedule, f"allowed: {list(LR_SCHEDULES)}"
        )
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _require(0 <= self.beta1 < 1, "optim.beta1", self.beta1, "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "optim.beta2", self.beta2, "must be in [0, 1)")
        _require(self.grad_clip >= 0, "optim.grad_clip", self.grad_clip, "must be >= 0")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        mode, n = self.curriculum.mode, self.rollout.n
        if mode == "speed":
            _require(
                n >= 2,
                "rollout.n",
                n,
                "SPEED screens with rollout.n >= 2 samples (one sample never qualifies)",
            )
            _require(
                self.rollout.n_continue >= 1,
                "rollout.n_continue",
                self.rollout.n_continue,
                "must be >= 1 with curriculum.mode = 'speed' (set curriculum.mode = 'none' for plain groups)",
            )
        else:
            _require(n >= 2, "rollout.n", n, f"group-relative advantages need rollout.n >= 2 ({mode} mode)")
            _require(
                self.rollout.n_continue == 0,
                "rollout.n_continue",
                self.rollout.n_continue,
                f"must be 0 with curriculum.mode = {mode!r}: only SPEED continues prompts",
            )
        tbs, mbs = self.data.train_batch_size, self.algorithm.mini_batch_size
        _require(
            tbs % mbs == 0,
            "algorithm.mini_batch_size",
            mbs,
            f"must divide data.train_batch_size = {tbs} (optimizer steps per RL step = train / mini batch)",
        )
        _require(
            self.algorithm.overlong_buffer < self.rollout.max_response_length,
            "algorithm.overlong_buffer",
            self.algorithm.overlong_buffer,
            f"must be < rollout.max_response_length = {self.rollout.max_response_length}",
        )
        if self.cluster.num_learner_ranks > 1:
            _require(
                mbs % self.cluster.num_learner_ranks == 0,
                "algorithm.mini_batch_size",
                mbs,
                f"must be a multiple of cluster.num_learner_ranks = {self.cluster.num_learner_ranks}",
            )

    @property
    def group_size(self) -> int:
        """Responses per trained group: n + n_continue under SPEED, n otherwise."""
        return self.rollout.n + (self.rollout.n_continue if self.curriculum.mode == "speed" else 0)

    @property
    def optimizer_steps_per_rl_step(self) -> int:
        """train_batch_size / mini_batch_size: the same for every algorithm."""
        return self.data.train_batch_size // self.algorithm.mini_batch_size
