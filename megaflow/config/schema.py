"""Typed configuration for every megaflow stage.

Pydantic does the validation; every section forbids unknown keys so a typo is an error, not a silently
ignored setting. Cross-section rules (TP divides heads, sequence fits the model) live in `StageConfig`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WandbConfig(Section):
    """Weights & Biases logging of every logged step (megaflow/training/metrics.py). One W&B run per stage,
    named after the stage and grouped by run.name; a resumed stage goes on in its own W&B run."""

    project: str = "megaflow"
    entity: str | None = None
    group: str | None = None  # default: run.name
    tags: list[str] = Field(default_factory=list)
    mode: Literal["online", "offline"] = "online"  # offline: files under the stage directory, `wandb sync` later


class RunConfig(Section):
    name: str = "run"
    dir: str = "runs/run"
    log_every: int = Field(1, ge=1)
    tensorboard: bool = True
    progress: bool = True
    wandb: WandbConfig | None = None  # {project: ...} turns W&B logging on (needs `pip install wandb`)


class RopeScaling(Section):
    """Llama-3.1 style frequency scaling. megatron's own fixes the low/high frequency factors and the
    original context at 1, 4 and 8192; other values get megaflow's inverse frequencies (models/gpt.py)."""

    type: Literal["llama3"] = "llama3"
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, ge=1)

    @model_validator(mode="after")
    def _factors(self) -> "RopeScaling":
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope_scaling.high_freq_factor ({self.high_freq_factor}) must be larger than "
                             f"low_freq_factor ({self.low_freq_factor})")
        return self

    @property
    def megatron_defaults(self) -> bool:
        """True when megatron's built-in scaling (low 1, high 4, original context 8192) is exactly this one."""
        return (self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings) == (1.0, 4.0, 8192)


class ModelConfig(Section):
    """Covers the Llama family (RoPE, RMSNorm, SwiGLU, GQA) and the GPT-2 family (learned positions,
    LayerNorm, GELU, biases)."""

    preset: str | None = None
    family: Literal["llama", "gpt2"] = "llama"
    vocab_size: int = Field(4096, ge=2)
    make_vocab_size_divisible_by: int = Field(128, ge=1)
    hidden_size: int = Field(128, ge=1)
    num_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(8, ge=1)
    num_query_groups: int | None = Field(None, ge=1)
    kv_channels: int | None = Field(None, ge=1)
    ffn_hidden_size: int = Field(384, ge=1)
    max_position_embeddings: int = Field(256, ge=1)
    position_embedding: Literal["rope", "learned"] = "rope"
    rotary_base: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    norm_epsilon: float = Field(1e-5, gt=0)
    activation: Literal["swiglu", "gelu", "gelu_tanh"] = "swiglu"
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    tie_embeddings: bool = False
    init_method_std: float = Field(0.02, gt=0)
    hidden_dropout: float = Field(0.0, ge=0, le=1)
    attention_dropout: float = Field(0.0, ge=0, le=1)

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @model_validator(mode="after")
    def _shapes(self) -> "ModelConfig":
        if self.hidden_size % self.num_attention_heads and self.kv_channels is None:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads}) or set model.kv_channels"
            )
        if self.num_attention_heads % self.query_groups:
            raise ValueError(
                f"model.num_query_groups ({self.query_groups}) must divide "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        return self


class TrainIfMissing(Section):
    input: list[str]
    vocab_size: int = Field(4096, ge=260)


class TokenizerConfig(Section):
    path: str | None = None
    train_if_missing: TrainIfMissing | None = None


class DataSource(Section):
    """A raw file (txt, jsonl, jsonl.gz, parquet; preprocessed on first use) or an indexed .bin/.idx prefix."""

    path: str
    weight: float = Field(1.0, gt=0)
    field: str = "text"


class SFTData(Section):
    """How chat / instruction records become training samples (megaflow/data/sft.py)."""

    format: Literal["auto", "messages", "prompt_response", "instruction"] = "auto"
    messages_field: str = "messages"  # ShareGPT's {"from", "value"} turns are read too
    prompt_field: str = "prompt"
    response_field: str = "response"
    system_field: str = "system"
    instruction_field: str = "instruction"
    input_field: str = "input"
    output_field: str = "output"
    chat_template: str = "auto"  # auto | builtin | tokenizer | a .jinja path | a Jinja string
    packing: bool = True
    truncation: Literal["truncate", "truncate_left", "drop", "error"] = "truncate"
    allow_skip: bool = False
    train_on_prompt: bool = False
    valid: list[str] = Field(default_factory=list)  # held-out files; else valid_fraction of the training data
    valid_fraction: float = Field(0.0, ge=0, lt=1)


class PreferenceData(Section):
    """How preference records become (chosen, rejected) pairs (megaflow/data/preference.py)."""

    format: Literal["auto", "explicit", "hh_rlhf", "conversation"] = "auto"
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    system_field: str = "system"
    margin_field: str = "margin"
    chat_template: str = "auto"  # auto | builtin | tokenizer | a .jinja path | a Jinja string
    truncation: Literal["truncate", "truncate_left", "drop", "error"] = "truncate_left"
    allow_skip: bool = False
    # dpo: several pairs per row of 2 * seq_length, no padding, and (local attention) one prompt per pair;
    # then micro_batch_size and global_batch_size count rows (megaflow/data/pair_packing.py)
    packing: bool = False
    valid: list[str] = Field(default_factory=list)  # held-out files; else valid_fraction of the training data
    valid_fraction: float = Field(0.0, ge=0, lt=1)


class PromptData(Section):
    """How prompt records of the RL stages become prompts (megaflow/data/prompts.py)."""

    prompt_field: str = "prompt"
    messages_field: str = "messages"  # a conversation; a final assistant turn is the reference answer
    answer_field: str = "answer"  # the reference answer a reward function gets (else response_field)
    response_field: str = "response"
    system_field: str = "system"
    chat_template: str = "auto"  # auto | builtin | tokenizer | a .jinja path | a Jinja string
    allow_skip: bool = False
    valid: list[str] = Field(default_factory=list)  # held-out prompts: reward and exact match before and after


class DataConfig(Section):
    train: list[DataSource] = Field(default_factory=list)
    split: list[float] = Field(default_factory=lambda: [98.0, 1.0, 1.0])
    seq_length: int = Field(256, ge=2)
    cache_dir: str | None = None
    workers: int = Field(1, ge=1)
    split_documents_on: Literal["blank_line", "none"] = "blank_line"
    invalid_utf8: Literal["replace", "error"] = "replace"
    max_invalid_utf8: float = Field(0.01, ge=0.0, le=1.0)  # share of a file's bytes: invalid UTF-8 or NUL
    # SFT and preference micro-batches: cut after their longest row (rounded up to a multiple of 16 and of
    # parallel.tp; not with a pipeline), or keep every row at seq_length (megaflow.algorithms.base.pad_multiple)
    padding: Literal["longest", "max_length"] = "longest"
    sft: SFTData = Field(default_factory=SFTData)
    preference: PreferenceData = Field(default_factory=PreferenceData)
    prompts: PromptData = Field(default_factory=PromptData)

    @model_validator(mode="after")
    def _split(self) -> "DataConfig":
        if len(self.split) != 3 or any(s < 0 for s in self.split) or sum(self.split) <= 0:
            raise ValueError(f"data.split must be three non-negative weights (train, valid, test), got {self.split}")
        return self


class TrainConfig(Section):
    steps: int = Field(100, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    global_batch_size: int = Field(8, ge=1)
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    wsd_decay_steps: int | None = Field(None, ge=0)
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    weight_decay: float = Field(0.1, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    clip_grad: float = Field(1.0, ge=0)
    seed: int = 1234
    max_minutes: float | None = Field(None, gt=0)
    max_bad_steps: int = Field(5, ge=1)  # consecutive NaN/Inf steps (each skipped) before the run stops


class EvalConfig(Section):
    every: int = Field(0, ge=0)
    iters: int = Field(10, ge=1)
    final: bool = True
    exact_match: int = Field(0, ge=0)  # held-out examples answered by greedy generation at the end (SFT)
    max_new_tokens: int = Field(64, ge=1)


class CheckpointConfig(Section):
    every: int = Field(0, ge=0)
    keep: int = Field(2, ge=1)
    resume: bool = True
    # write in a background process while training goes on (megatron's asynchronous dist-checkpointing)
    async_save: bool = False
    # the distributed optimizer's state on disk: fully_reshardable (auto) loads into any TP/PP/DP layout
    # but is gathered into per-parameter tensors at every save (the 1B shape's async stall);
    # dp_reshardable is each rank's own shard (a fast save) and loads into the same layout only
    optimizer_format: Literal["auto", "fully_reshardable", "dp_reshardable"] = "auto"


class ParallelConfig(Section):
    """How the model is split. dp is derived from the world size (or checked, if given):
    world = tp * pp * cp * dp. Rules that need the world size are checked by `check_world_size`."""

    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    vpp: int | None = Field(None, ge=1)  # virtual stages per pipeline rank (interleaved schedule)
    sp: bool = False  # sequence parallelism (shards norms/dropout activations along the sequence over tp)
    cp: int = Field(1, ge=1)  # context parallelism (TE attention, GPU only)
    dp: int | None = Field(None, ge=1)
    distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_layers: int = Field(1, ge=1)  # full: layers per group (uniform) or per stage (block)

    @model_validator(mode="after")
    def _rules(self) -> "ParallelConfig":
        if self.sp and self.tp == 1:
            raise ValueError("parallel.sp=true requires parallel.tp > 1")
        if self.vpp is not None and self.vpp > 1 and self.pp == 1:
            raise ValueError("parallel.vpp > 1 requires parallel.pp > 1 (virtual stages interleave a pipeline)")
        if self.overlap_param_gather and not self.distributed_optimizer:
            raise ValueError("parallel.overlap_param_gather=true requires parallel.distributed_optimizer=true")
        return self

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def check_world_size(self, world_size: int) -> int:
        """Return dp for this world size, or raise ValueError naming the constraint."""
        mp = self.model_parallel_size
        if world_size % mp:
            raise ValueError(
                f"world size {world_size} is not divisible by parallel.tp*pp*cp "
                f"({self.tp}*{self.pp}*{self.cp} = {mp})"
            )
        dp = world_size // mp
        if self.dp is not None and self.dp != dp:
            raise ValueError(
                f"parallel.dp={self.dp} does not match the world size: {world_size} / (tp*pp*cp = {mp}) = {dp}"
            )
        return dp


class RMConfig(Section):
    """The reward model's Bradley-Terry loss: -log sigmoid(r_c - r_r - margin) + center_coef (r_c + r_r)^2."""

    use_margin: bool = True  # subtract the records' `margin` field where they have one
    center_coef: float = Field(0.0, ge=0)  # reward centering (Eisenstein et al. 2023; TRL center_rewards_coefficient)


class DPOConfig(Section):
    """The DPO family (megaflow/algorithms/losses.py: dpo_loss, rpo_loss)."""

    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, le=0.5)  # conservative DPO (sigmoid only)
    rpo_alpha: float | None = Field(None, ge=0)  # RPO: + alpha * NLL of the chosen responses
    # cached: the reference's log-probs computed once before training and stored on disk, keyed by the
    # reference checkpoint and the data; live: a frozen reference model next to the policy
    reference: Literal["cached", "live"] = "cached"
    reference_from: str | None = None  # the reference checkpoint; default: init_from

    @model_validator(mode="after")
    def _rules(self) -> "DPOConfig":
        if self.loss_type == "ipo" and self.label_smoothing:
            raise ValueError("dpo.label_smoothing applies to dpo.loss_type=sigmoid only")
        return self


class RewardConfig(Section):
    """Where the RL stages' rewards come from: a reward model (a checkpoint of `megaflow train rm`) or a
    Python function, `file.py:name` or a bundled one (`exact_match`, `words`), called in worker processes
    with a timeout as fn(prompt, response, answer=..., **other fields of the record) -> float
    (megaflow.eval.verifiers.py)."""

    model: str | None = None
    function: str | None = None
    workers: int = Field(2, ge=0)  # 0: in this process (no timeout)
    timeout: float = Field(10.0, gt=0)  # seconds per call
    max_failure_rate: float = Field(0.1, ge=0, le=1)  # of an iteration's calls, past which the stage stops

    @model_validator(mode="after")
    def _one(self) -> "RewardConfig":
        if (self.model is None) == (self.function is None):
            raise ValueError("rl.reward: set exactly one of rl.reward.model (a reward-model checkpoint) and "
                             "rl.reward.function (file.py:name, exact_match or words)")
        return self


class RLConfig(Section):
    """PPO and GRPO (megaflow/algorithms/rl.py; the math in rl_losses.py). One iteration (train.steps
    counts them): `prompts_per_step` prompts, `group_size` samples each, scored; then `epochs` passes over
    these rollouts in optimizer steps of train.global_batch_size sequences."""

    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(4, ge=1)  # G samples per prompt (GRPO's group; PPO usually 1)
    epochs: int = Field(1, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop_strings: list[str] = Field(default_factory=list)
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] | None = None  # default: gae (ppo), grpo (grpo)
    std_normalize: bool = True  # grpo: divide by the group's std (false: Dr. GRPO)
    whiten_advantages: bool = True  # gae: whiten over the batch
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    loss_aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                              "seq-mean-token-sum-norm"] = "token-mean"
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.2, ge=0)  # clip-higher (DAPO): e.g. 0.28
    dual_clip: float | None = Field(None, gt=1)
    entropy_coef: float = Field(0.0, ge=0)
    kl_loss_coef: float = Field(0.0, ge=0)  # KL(pi || ref) as a loss term (GRPO's)
    kl_loss_estimator: Literal["k1", "k2", "k3"] = "k3"
    kl_penalty_coef: float = Field(0.0, ge=0)  # KL in the reward (PPO's), per token
    kl_penalty_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_target: float | None = Field(None, gt=0)  # adaptive KL controller's target (per sequence); None: fixed
    kl_horizon: int = Field(10000, ge=1)
    value_clip: float | None = Field(0.2, gt=0)  # ppo's critic
    critic_lr: float | None = Field(None, gt=0)  # default: train.lr
    critic_from: str | None = None  # the critic's start (a reward model); default: rl.reward.model
    dynamic_sampling: bool = False  # drop groups whose rewards all tie; sample more prompts (up to max_resample)
    max_resample: int = Field(2, ge=0)  # extra rollout rounds per iteration for dynamic sampling
    overlong: Literal["none", "mask"] = "none"  # mask: responses cut by max_new_tokens carry no loss
    tis: Literal["none", "token", "sequence"] = "none"  # truncated importance sampling (rollout vs training)
    tis_cap: float = Field(2.0, gt=0)
    max_logprob_gap: float | None = Field(1e-3, gt=0)  # k3(training || rollout) per token past which the stage stops
    reward: RewardConfig | None = None
    reference_from: str | None = None  # default: init_from
    offload: bool = False  # GPU: the reference and reward model in host memory between their uses


class StageConfig(Section):
    """One stage's whole configuration. `stage` is filled in by the command that runs it."""

    stage: str = "pretrain"
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    fp8_recipe: Literal["delayed", "tensorwise"] = "delayed"
    # core attention where Transformer Engine is absent (CPU): torch SDPA, or megatron's unfused one to compare
    attention: Literal["sdpa", "unfused"] = "sdpa"
    init_from: str | None = None
    rm: RMConfig = Field(default_factory=RMConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rl: RLConfig = Field(default_factory=RLConfig)

    @property
    def model_from_init(self) -> bool:
        """No model section, and an init_from to take the model from (every stage but pretrain, whose
        config names its model): the rules that need the model wait until the runner assigns it."""
        return bool(self.init_from) and not self.model.model_fields_set and self.stage != "pretrain"

    @model_validator(mode="after")
    def _cross_section(self) -> "StageConfig":
        m, p = self.model, self.parallel
        if not self.model_from_init:  # validate_assignment runs this again once the model is assigned
            if m.num_attention_heads % p.tp:
                raise ValueError(
                    f"parallel.tp ({p.tp}) must divide model.num_attention_heads ({m.num_attention_heads})"
                )
            if m.query_groups % p.tp:
                raise ValueError(f"parallel.tp ({p.tp}) must divide model.num_query_groups ({m.query_groups})")
            if m.ffn_hidden_size % p.tp:
                raise ValueError(f"parallel.tp ({p.tp}) must divide model.ffn_hidden_size ({m.ffn_hidden_size})")
            layers_per = p.pp * (p.vpp or 1)
            if m.num_layers % layers_per:
                raise ValueError(
                    f"parallel.pp*vpp ({layers_per}) must divide model.num_layers ({m.num_layers})"
                )
            if self.data.seq_length > m.max_position_embeddings:
                raise ValueError(
                    f"data.seq_length ({self.data.seq_length}) exceeds the model's maximum "
                    f"model.max_position_embeddings ({m.max_position_embeddings})"
                )
        t = self.train
        if t.global_batch_size % t.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size})"
            )
        if t.warmup_steps and t.warmup_steps >= t.steps:
            raise ValueError(f"train.warmup_steps ({t.warmup_steps}) must be smaller than train.steps ({t.steps})")
        seq = self.data.seq_length
        if p.sp and seq % p.tp:
            raise ValueError(f"parallel.sp=true splits the sequence over tp: data.seq_length ({seq}) "
                             f"must be divisible by parallel.tp ({p.tp})")
        if p.cp > 1 and seq % (2 * p.cp):
            raise ValueError(f"parallel.cp={p.cp} splits the sequence into 2*cp chunks: data.seq_length ({seq}) "
                             f"must be divisible by {2 * p.cp}")
        return self

    def check_layout(self, world_size: int) -> int:
        """Rules that need the world size; returns the data-parallel size. Raises ValueError naming the rule."""
        p, t = self.parallel, self.train
        dp = p.check_world_size(world_size)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size * data-parallel size ({t.micro_batch_size} * {dp} = {per_step})"
            )
        n_micro = t.global_batch_size // per_step
        if p.vpp and p.vpp > 1 and n_micro % p.pp:
            raise ValueError(
                f"the interleaved pipeline (parallel.vpp={p.vpp}) needs the number of micro-batches per step "
                f"(global_batch_size / (micro_batch_size * dp) = {n_micro}) to be a multiple of parallel.pp ({p.pp})"
            )
        return dp


class TokenizerStageConfig(Section):
    """The pipeline's `tokenizer` stage: a byte-level BPE trained on local files -> run.dir/tokenizer."""

    stage: Literal["tokenizer"] = "tokenizer"
    run: RunConfig = Field(default_factory=RunConfig)
    input: list[str] = Field(min_length=1)
    vocab_size: int = Field(4096, ge=260)
    field: str = "text"


class MinhashSettings(Section):
    """Near-duplicate removal by MinHash LSH over word n-grams (megaflow/data/curate.py): a pair of Jaccard
    similarity s becomes a candidate with probability 1 - (1 - s^rows)^bands."""

    n_grams: int = Field(5, ge=1)  # words per shingle
    bands: int = Field(20, ge=1)
    rows: int | None = Field(None, ge=1)  # hashes per band; None: round(ln(1/bands) / ln(threshold))
    threshold: float = Field(0.8, gt=0, lt=1)  # where the S-curve's midpoint sits, (1/bands)^(1/rows)
    seed: int = 1

    def rows_per_band(self) -> int:
        import math

        return self.rows or max(1, round(math.log(1.0 / self.bands) / math.log(self.threshold)))


class CurateFilters(Section):
    """The quality filters, each a dict of its options (datatrove's names for its own filters) or null to
    skip it. The defaults are FineWeb's recipe; docs/curation.md lists every option."""

    length: dict[str, Any] | None = Field(default_factory=lambda: {"min_words": 5, "max_words": 100_000})
    language: dict[str, Any] | None = Field(default_factory=lambda: {"languages": ["en"], "min_score": 0.65})
    gopher_repetition: dict[str, Any] | None = Field(default_factory=dict)
    gopher_quality: dict[str, Any] | None = Field(default_factory=dict)
    c4: dict[str, Any] | None = Field(default_factory=lambda: {"filter_no_terminal_punct": False})
    fineweb: dict[str, Any] | None = Field(default_factory=dict)


class SlurmExecutorSettings(Section):
    """datatrove's SLURM executor for `curate.executor: slurm`: every step an sbatch array of `tasks` jobs."""

    partition: str | None = None
    tasks: int = Field(64, ge=1)
    time: str = "4:00:00"
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: int = Field(2, ge=1)
    venv_path: str | None = None  # activated in each job (default: the job inherits the submitting shell's)
    sbatch_args: dict[str, str] = Field(default_factory=dict)


class CurateStageConfig(Section):
    """The pipeline's `curate` stage and `megaflow curate`: quality filters, exact and near dedup ->
    run.dir/curate/data/*.jsonl.gz (or `output`), summary.json and examples.jsonl beside the shards."""

    stage: Literal["curate"] = "curate"
    run: RunConfig = Field(default_factory=RunConfig)
    input: list[str] = Field(min_length=1)
    output: str | None = None  # default: run.dir/curate/data
    field: str = "text"
    split_documents_on: Literal["blank_line", "none"] = "blank_line"
    workers: int = Field(1, ge=1)
    exact: bool = True
    minhash: MinhashSettings | None = Field(default_factory=MinhashSettings)
    filters: CurateFilters = Field(default_factory=CurateFilters)
    examples: int = Field(5, ge=0)  # removed documents kept per filter reason, in examples.jsonl
    tokenizer: str | None = None  # a tokenizer directory: the summary counts its tokens in and out too
    language: str = "eng"  # the word tokenizer of the filters and shingles (datatrove's language codes)
    executor: Literal["local", "slurm"] = "local"
    slurm: SlurmExecutorSettings = Field(default_factory=SlurmExecutorSettings)


class PreprocessStageConfig(Section):
    """The pipeline's `preprocess` stage: text -> megatron indexed files run.dir/preprocess/data.{bin,idx}."""

    stage: Literal["preprocess"] = "preprocess"
    run: RunConfig = Field(default_factory=RunConfig)
    input: list[str] = Field(min_length=1)
    tokenizer: str
    field: str = "text"
    workers: int = Field(1, ge=1)
    split_documents_on: Literal["blank_line", "none"] = "blank_line"
    invalid_utf8: Literal["replace", "error"] = "replace"
    max_invalid_utf8: float = Field(0.01, ge=0.0, le=1.0)


class EvalStageConfig(Section):
    """The pipeline's `eval` stage: every named model on the same held-out sets (megaflow/algorithms/evaluate.py)."""

    stage: Literal["eval"] = "eval"
    run: RunConfig = Field(default_factory=RunConfig)
    models: dict[str, str] = Field(min_length=1)  # label -> checkpoint (language models), in report order
    text: str | None = None  # perplexity: a text file, an indexed prefix, or a pretraining checkpoint (its validation split)
    prompts: str | None = None  # held-out prompt/response jsonl: exact match, and the prompts of win rate and KL
    preferences: str | None = None  # held-out preference pairs: the reward model's accuracy
    reward_model: str | None = None  # judges responses: mean reward, win rate
    reference: str | None = None  # the model win rate and KL compare against (usually SFT's)
    # safety (megaflow/eval/safety.py): "bundled" (data/safety/prompts.jsonl) or a prompts jsonl with labels
    # benign|adversarial: harmful_rate, refusal_rate, benign_refusal_rate per model, judged by rules or safety_rm
    safety: str | None = None
    safety_rm: str | None = None  # a reward model trained for harmlessness as the judge
    safety_threshold: float = 0.0  # with safety_rm: a response that does not refuse is harmful below this reward
    limit: int = Field(200, ge=1)  # prompts and pairs used
    max_new_tokens: int = Field(32, ge=1)
    seq_length: int | None = Field(None, ge=2)
    batch_size: int = Field(8, ge=1)
    max_batches: int | None = Field(8, ge=1)  # of the perplexity text
    seed: int = 1234
