"""`megaflow plan`: parameters, memory per GPU and the compute budget of a config, from formulas alone.

Plain arithmetic over the typed config (no torch, no megatron), so it answers in milliseconds.
docs/parallelism.md puts it to work on Llama-3.1-8B and 70B. Notation: L layers, h hidden size, a heads,
g query groups, d = kv_channels (default h/a), q = a·d, k = g·d, f ffn size, V vocabulary (megatron pads
it to a multiple of 128·t), s sequence, b micro-batch, m micro-batches per step, t tp, p pp, v vpp, c cp,
dp data-parallel size, D training tokens.

Parameters (exact for megatron's GPTModel; tests compare against built models):
    layer = h(q + 2k) + qh  (QKV, projection)  +  (2 if SwiGLU else 1)·hf + fh  (MLP)
            + 2 norms (h each; 2h for LayerNorm) + biases (q + 2k, h, f or 2f, h) when enabled
    total = L·layer + V·h (+ S_max·h learned positions) + final norm (+ V·h untied output layer)
  Published counts (Llama-3.1 8.03B / 70.6B) use the unpadded vocabulary; `total` uses the padded one.

Memory per GPU, for the first and the last pipeline rank (bytes):
    P_rank     = (L/p)·(layer_split/t + layer_whole) + V·h/t (+ S_max·h) on the first rank
                 + final norm + V·h/t on the last (also a copy of a tied embedding when p > 1);
                 norms and the row-parallel biases are whole on every TP rank, the rest is split.
    weights    = 2·P_rank for bf16/fp8 (fp8 keeps bf16 parameters), 4·P_rank for fp32
    grads      = 4·P_rank: megatron DDP's fp32 main-grad buffer (grad_reduce_in_fp32=True, models/gpt.py),
                 full size even with the distributed optimizer (it reduce-scatters from it)
    optimizer  = 12·P_rank for bf16/fp8 (fp32 master weights, Adam m and v), 8·P_rank for fp32 (m, v),
                 divided by dp·c with the distributed optimizer: megatron's table, 18 -> 6 + 12/dp B/param
    activations, per layer and micro-batch, from Korthikanti et al. 2022, "Reducing Activation
      Recomputation in Large Transformer Models" §4, which gives sbh(34 + 5as/h) for a GPT layer (4h GeLU
      MLP, dropout, 16-bit). Term by term, generalised to GQA, SwiGLU and dropout-free models (e bytes per
      element: 2, or 4 for fp32; masks 1 byte):
        whole  = sbh·(4e [+ 2 with dropout])   norm inputs, QKV and fc1 inputs [dropout masks]     ("10")
        split  = sb·(e(q+2k) + eq + 2ef)       Q, K, V, projection input, GeLU in/out (SwiGLU 3ef)  ("24")
        scores = a·s²·b·(e [+ 1 + e with attention dropout])   softmax [dropout mask and output]  ("5as/h")
        layer  = whole/(t if sp else 1) + (split + scores)/t,  s -> s/c with context parallelism
      Flash / TE fused attention keeps no s×s matrix, so `scores` is 0 unless attention="unfused";
      selective recompute also drops it. Full recompute keeps each group's input e·sbh (/t with sp) and,
      while a group is recomputed, that group's full activations (uniform: recompute_layers layers;
      block: the first recompute_layers layers of a chunk are recomputed one by one, the rest stored).
      Micro-batches in flight on rank r (megatron's warm-up + 1): 1 without pp, min(p - r, m) for 1F1B,
      (p - r - 1)·2 + (v - 1)·p + 1 chunk passes interleaved — L·(1 + (p-1)/(pv)) layers on the first
      rank, the paper's §4.2.3 factor. The last rank adds the output layer, 4sbh/t·(1 + V/h) (final norm
      and output inputs, fp32 logits kept by the cross-entropy; §4.3), the first the embedding's dropout
      mask sbh/t per micro-batch in flight.
    overhead   = a fixed allowance (default 3 GiB): CUDA context, cuBLAS/TE/NCCL workspaces, fragmentation.

Compute (Kaplan et al. 2020; Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU
Clusters Using Megatron-LM", appendix):
    FLOPs = 6·N·D + 6·L·s·q·D
  6·N·D: 2 FLOPs per parameter per token forward, twice that backward, N = all parameters (as the 175B of
  GPT-3 and the published Llama budgets count; for an untied model this counts the embedding lookup as a
  matmul). The attention term is QKᵀ and scores·V: 4·s·q FLOPs per token and layer forward, ×3 with the
  backward, halved because causal attention computes only the lower triangle, as Megatron-LM's
  num_floating_point_operations and megaflow's MFU metric (models/size.flops_per_step) do; Narayanan et al.
  count the full matrix, 12·L·s·h·D (= 2× this). MFU counts model FLOPs: recomputation is not in it.
    GPU-hours = FLOPs / (peak · MFU) / 3600,  wall-clock = GPU-hours / GPUs,  cost = GPU-hours · price
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megaflow.config import StageConfig, load_config, load_yaml_tree
from megaflow.config.schema import ModelConfig
from megaflow.errors import UserError
from megaflow.models.size import ParamCount, count_parameters, padded_vocab_size, training_flops  # noqa: F401

GiB = 2**30
# Dense tensor-core peaks of an H100 SXM, TFLOP/s (fp32: megaflow enables no TF32, so plain FP32).
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0}
OVERHEAD_GIB = 3.0


# ---------------------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Everything about the run that memory depends on besides the model shape."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    dp: int = 1
    sp: bool = False
    distributed_optimizer: bool = False
    recompute: str = "none"  # none | selective | full
    recompute_method: str = "uniform"  # uniform | block
    recompute_layers: int = 1
    precision: str = "bf16"  # fp32 | bf16 | fp8
    seq_length: int = 2048
    micro_batch: int = 1
    num_microbatches: int = 1
    flash_attention: bool = True  # TE fused / flash attention: no s×s score matrix is stored

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def bubble(self) -> float:
        """Pipeline bubble as a fraction of the ideal step time, (p-1)/(v·m) (Narayanan et al. 2021 §2.2)."""
        return (self.pp - 1) / (self.vpp * self.num_microbatches)

    @classmethod
    def from_config(cls, cfg: StageConfig, dp: int, flash_attention: bool = True) -> "Layout":
        p, t = cfg.parallel, cfg.train
        return cls(tp=p.tp, pp=p.pp, vpp=p.vpp or 1, cp=p.cp, dp=dp, sp=p.sp,
                   distributed_optimizer=p.distributed_optimizer, recompute=p.recompute,
                   recompute_method=p.recompute_method, recompute_layers=p.recompute_layers,
                   precision=cfg.precision, seq_length=cfg.data.seq_length, micro_batch=t.micro_batch_size,
                   num_microbatches=max(1, t.global_batch_size // (t.micro_batch_size * dp)),
                   flash_attention=flash_attention)


# ---------------------------------------------------------------------------------------------- memory


def params_on_rank(pc: ParamCount, lay: Layout, rank: int, tied: bool) -> int:
    """Parameters held by one GPU of pipeline rank `rank` (embedding first, output layer last)."""
    t, p = lay.tp, lay.pp
    n = pc.num_layers // p * (pc.layer_split // t + pc.layer_whole)
    if rank == 0:
        n += pc.word_embedding // t + pc.position_embedding
    if rank == p - 1:
        n += pc.final_norm + pc.output_layer // t
        if tied and p > 1:  # the last stage keeps its own copy of the tied embedding for the logits
            n += pc.word_embedding // t
    return n


def state_bytes_per_param(precision: str) -> tuple[int, int, int]:
    """(weights, grads, optimizer) bytes per parameter with megatron's mixed-precision Adam."""
    if precision == "fp32":
        return 4, 4, 8  # fp32 params are the master copy: Adam m and v only
    return 2, 4, 12  # bf16 params, fp32 main grads, fp32 master params + m + v


def _element_bytes(lay: Layout) -> int:
    return 4 if lay.precision == "fp32" else 2  # activations are bf16 in bf16 and fp8 training


def layer_activation_bytes(model: ModelConfig, lay: Layout) -> float:
    """One layer's activations for one micro-batch on one GPU, as stored without recomputation, or as
    rebuilt while a full-recompute group runs its backward (module docstring)."""
    s, b, h, f = lay.seq_length / lay.cp, lay.micro_batch, model.hidden_size, model.ffn_hidden_size
    a = model.num_attention_heads
    d = model.kv_channels or h // a
    q, k, e = a * d, model.query_groups * d, _element_bytes(lay)
    whole = s * b * h * (4 * e + (2 if model.hidden_dropout > 0 else 0))
    split = s * b * (e * (q + 2 * k) + e * q + (3 if model.activation == "swiglu" else 2) * e * f)
    scores = 0.0
    if not lay.flash_attention and lay.recompute != "selective":  # selective recomputes core attention
        scores = a * s * lay.seq_length * b * (e + (1 + e if model.attention_dropout > 0 else 0))
    return whole / (lay.tp if lay.sp else 1) + (split + scores) / lay.tp


def layer_input_bytes(model: ModelConfig, lay: Layout) -> float:
    """What full recomputation keeps per layer group: its input, e·sbh (sequence-split with sp)."""
    s = lay.seq_length / lay.cp
    return _element_bytes(lay) * s * lay.micro_batch * model.hidden_size / (lay.tp if lay.sp else 1)


def passes_in_flight(lay: Layout, rank: int) -> int:
    """Forward passes (of one model chunk and micro-batch) whose activations pipeline rank `rank` holds at
    its peak under megatron's schedules: warm-up passes + 1."""
    p, v, m = lay.pp, lay.vpp, lay.num_microbatches
    if p == 1:
        return 1  # no pipelining: each micro-batch's backward follows its forward
    if v == 1:
        return min(p - rank, m)  # 1F1B
    return min((p - rank - 1) * 2 + (v - 1) * p + 1, m * v)  # interleaved 1F1B


def activation_bytes(model: ModelConfig, lay: Layout, rank: int, vocab_size: int) -> float:
    """Peak activations of pipeline rank `rank`: stored passes, the recompute working set, and the
    embedding (first rank) / output layer (last rank) extras."""
    per_chunk = model.num_layers // (lay.pp * lay.vpp)
    full, kept = layer_activation_bytes(model, lay), layer_input_bytes(model, lay)
    working = 0.0
    if lay.recompute != "full":
        stored = per_chunk * full
    elif lay.recompute_method == "uniform":  # groups of n layers: one input each, one group recomputed at a time
        n = min(lay.recompute_layers, per_chunk)
        stored, working = math.ceil(per_chunk / n) * kept, n * full
    else:  # block: the first n layers of each chunk recomputed one at a time, the rest stored
        n = min(lay.recompute_layers, per_chunk)
        stored, working = n * kept + (per_chunk - n) * full, full
    total = passes_in_flight(lay, rank) * stored + working
    s, b, h, t, e = lay.seq_length / lay.cp, lay.micro_batch, model.hidden_size, lay.tp, _element_bytes(lay)
    if rank == 0 and model.hidden_dropout > 0:
        total += min(lay.pp, lay.num_microbatches) * s * b * h / (t if lay.sp else 1)  # dropout mask, 1 byte
    if rank == lay.pp - 1:
        total += 2 * e * s * b * h / (t if lay.sp else 1) + 4 * s * b * vocab_size / t
    return total


@dataclass(frozen=True)
class Memory:
    """Bytes on one GPU of one pipeline rank."""

    stage: str  # "only" (no pipeline), "first" or "last"
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    overhead: float
    other_models: float = 0.0  # RL: the frozen reference and reward model, PPO's critic with its grads and optimizer
    kv_cache: float = 0.0  # RL: the rollouts' keys and values

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.overhead + self.other_models + self.kv_cache


def estimate_memory(model: ModelConfig, lay: Layout, vocab_size: int,
                    overhead_gib: float = OVERHEAD_GIB) -> list[Memory]:
    """Memory of the first and the last pipeline rank (one entry without pipeline parallelism)."""
    pc = count_parameters(model, vocab_size)
    w, g, o = state_bytes_per_param(lay.precision)
    shards = lay.dp * lay.cp if lay.distributed_optimizer else 1
    ranks = [(0, "only")] if lay.pp == 1 else [(0, "first"), (lay.pp - 1, "last")]
    out = []
    for rank, name in ranks:
        n = params_on_rank(pc, lay, rank, model.tie_embeddings)
        out.append(Memory(name, n, w * n, g * n, o * n / shards, activation_bytes(model, lay, rank, vocab_size),
                          overhead_gib * GiB))
    return out


def add_rl_memory(cfg: StageConfig, lay: Layout, memory: list[Memory]) -> tuple[list[Memory], list[str]]:
    """The RL stages (ppo, grpo) hold more than the actor, all in its layout (megaflow/algorithms/rl.py):

        reference   w·P_rank                     frozen, the actor's shape
        reward      w·P_rank                     a reward model (rl.reward.model), sized as the actor
        critic      (w + g + o/shards)·P_rank    PPO's (GAE advantages), sized as the actor
        KV cache    2·(L/p)·B·s·(g·d/t)·e        B = prompts_per_step·group_size/dp rollouts per replica

    Returns the memory with these added, and a note on what is assumed."""
    r, m = cfg.rl, cfg.model
    w, g, o = state_bytes_per_param(lay.precision)
    shards = lay.dp * lay.cp if lay.distributed_optimizer else 1
    critic = cfg.stage == "ppo" and (r.advantage or "gae") == "gae"
    reward_model = r.reward is not None and r.reward.model is not None
    rollouts = r.prompts_per_step * r.group_size / max(1, lay.dp)
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    kv = 2 * m.num_layers / lay.pp * rollouts * lay.seq_length * m.query_groups * d / lay.tp * _element_bytes(lay)
    memory = [dataclasses.replace(mem, kv_cache=kv, other_models=w * mem.params * (1 + reward_model)
                                  + (w + g + o / shards) * mem.params * critic) for mem in memory]
    models = ["reference"] + ["reward model"] * reward_model + ["critic"] * critic
    name = cfg.stage if cfg.stage in ("ppo", "grpo") else "rl"
    return memory, [f"{name}: {', '.join(models)} counted at the actor's size (other models), and the KV cache of "
                    f"{rollouts:g} rollouts of {lay.seq_length} positions per replica"]


# ---------------------------------------------------------------------------------------------- compute


@dataclass(frozen=True)
class Compute:
    """Training FLOPs for D tokens and the GPU time they take at a given peak and MFU."""

    tokens: float
    params: int
    dense_flops: float  # 6·N·D
    attention_flops: float  # 6·L·s·q·D (causal)
    gpus: int
    peak_tflops: float
    mfu: float
    price: float | None = None  # per GPU-hour

    @property
    def total_flops(self) -> float:
        return self.dense_flops + self.attention_flops

    @property
    def gpu_hours(self) -> float:
        return self.total_flops / (self.peak_tflops * 1e12 * self.mfu) / 3600

    @property
    def gpu_days(self) -> float:
        return self.gpu_hours / 24

    @property
    def wall_days(self) -> float:
        return self.gpu_days / self.gpus

    @property
    def cost(self) -> float | None:
        return None if self.price is None else self.gpu_hours * self.price


# ---------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    model: ModelConfig
    layout: Layout
    vocab_size: int  # padded, as megatron builds it at this tp
    params: ParamCount
    params_published: int  # with the unpadded vocabulary
    memory: list[Memory]
    gpu_memory_gib: float
    compute: Compute
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Memory:
        return max(self.memory, key=lambda m: m.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= self.gpu_memory_gib * GiB

    def to_dict(self) -> dict:
        gib = lambda x: round(x / GiB, 3)  # noqa: E731
        c = self.compute
        parts = ("weights", "grads", "optimizer", "activations", "overhead", "other_models", "kv_cache", "total")
        return {
            "model": self.model.model_dump(mode="json", exclude={"preset"}) | {"padded_vocab_size": self.vocab_size},
            "layout": asdict(self.layout) | {"gpus": self.layout.gpus, "pipeline_bubble": self.layout.bubble},
            "parameters": {"total": self.params.total, "published": self.params_published,
                           "per_layer": self.params.layer, "embedding": self.params.word_embedding
                           + self.params.position_embedding, "output_layer": self.params.output_layer},
            "memory_gib": {"gpu": self.gpu_memory_gib, "fits": self.fits,
                           "headroom": gib(self.gpu_memory_gib * GiB - self.peak.total), "peak_stage": self.peak.stage,
                           "stages": [{"stage": m.stage, "params": m.params} | {k: gib(getattr(m, k)) for k in parts}
                                      for m in self.memory]},
            "compute": {"tokens": c.tokens, "flops_6nd": c.dense_flops, "flops_attention": c.attention_flops,
                        "flops_total": c.total_flops, "peak_tflops": c.peak_tflops, "mfu": c.mfu, "gpus": c.gpus,
                        "gpu_hours": c.gpu_hours, "gpu_days": c.gpu_days, "wall_days": c.wall_days,
                        "price_per_gpu_hour": c.price, "cost": c.cost},
            "notes": self.notes,
        }


def sets_seq_length(path: str | Path, overrides: list[str] = ()) -> bool:
    """Whether the config file (through its extends:) or an override sets data.seq_length; a model-only
    preset has no data section."""
    if any(item.startswith("data.seq_length=") for item in overrides):
        return True
    return "seq_length" in (load_yaml_tree(path).get("data") or {})


def load_plan_config(path: str | Path, overrides: list[str] = (), seq_length: int | None = None) -> StageConfig:
    """CONFIG with data.seq_length set to the sequence to plan for: `seq_length`, else the config's own,
    else model.max_position_embeddings. The schema then checks it as training would (sp, cp, the maximum)."""
    overrides = list(overrides)
    if seq_length is None and not sets_seq_length(path, overrides):
        seq_length = load_config(path, overrides, defaults={"stage": "pretrain"}).model.max_position_embeddings
    if seq_length is not None:
        overrides.append(f"data.seq_length={seq_length}")
    return load_config(path, overrides, defaults={"stage": "pretrain"})


def make_plan(cfg: StageConfig, *, gpus: int | None = None, gpu_memory_gib: float = 80.0,
              tokens: float | None = None, peak_tflops: float | None = None, mfu: float = 0.4,
              price: float | None = None, flash_attention: bool = True, overhead_gib: float = OVERHEAD_GIB) -> Plan:
    """The plan of `cfg` (at its data.seq_length) on `gpus` GPUs (default: tp·pp·cp·dp, dp from parallel.dp
    or 1). A world size the layout cannot have, or a nonsensical flag, is a UserError; a layout that
    `megaflow train` would refuse for its batch sizes is planned anyway, with a note saying why."""
    p, m, t, seq = cfg.parallel, cfg.model, cfg.train, cfg.data.seq_length
    positive = {"--gpu-memory": gpu_memory_gib, "--mfu": mfu, "--peak-tflops": peak_tflops, "--tokens": tokens,
                "--gpus": gpus}
    bad = [f"{k} must be a positive finite number (got {v:g})" for k, v in positive.items()
           if v is not None and not 0 < v < float("inf")]  # NaN fails too
    bad += [f"{k} must not be negative (got {v:g})" for k, v in (("--overhead", overhead_gib), ("--price", price))
            if v is not None and v < 0]
    if mfu > 1:
        bad.append(f"--mfu is a fraction of the peak, at most 1 (got {mfu:g})")
    if bad:
        raise UserError(bad[0])
    gpus = gpus or p.model_parallel_size * (p.dp or 1)
    try:
        dp = p.check_world_size(gpus)
    except ValueError as e:
        raise UserError(f"--gpus {gpus}: {e}") from None
    lay = Layout.from_config(cfg, dp, flash_attention)
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, p.tp)
    pc = count_parameters(m, vocab)
    published = count_parameters(m, m.vocab_size).total
    tokens = tokens if tokens is not None else float(t.steps * t.global_batch_size * seq)
    dense, attention = training_flops(m, pc.total, tokens, seq)
    compute = Compute(tokens, pc.total, dense, attention, gpus, peak_tflops or PEAK_TFLOPS[cfg.precision], mfu, price)

    notes = []
    try:
        cfg.check_layout(gpus)  # the batch-size rules megaflow train applies at start
    except ValueError as e:
        notes.append(f"megaflow train would refuse this layout: {e}")
    if p.pp > 1 and lay.num_microbatches < p.pp:
        notes.append(f"{lay.num_microbatches} micro-batches per step < pp={p.pp}: most of each step is pipeline bubble")
    if p.recompute == "selective" and flash_attention:
        notes.append("recompute=selective recomputes core attention, whose s*s scores flash attention never stores: "
                     "no memory saved here")
    if cfg.precision == "fp8":
        notes.append("fp8: Transformer Engine's cached FP8 weight copies (1-2 B per linear weight) are not counted")
    memory = estimate_memory(m, lay, vocab, overhead_gib)
    if cfg.stage in ("ppo", "grpo") or "rl" in cfg.model_fields_set:  # a stage file with an rl section: RL
        memory, more = add_rl_memory(cfg, lay, memory)
        notes += more
    return Plan(m, lay, vocab, pc, published, memory, gpu_memory_gib, compute, notes)


# ---------------------------------------------------------------------------------------------- report


def _si(x: float) -> str:
    """8.03B, 70.6B, 300.0B: three significant digits at least."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{2 if abs(x) < 10 * scale else 1}f}{unit}"
    return f"{x:g}"


def format_plan(plan: Plan, title: str = "") -> str:
    """The human-readable report: model, layout, parameters, memory table, compute budget."""
    m, lay, pc, c = plan.model, plan.layout, plan.params, plan.compute
    w, g, o = state_bytes_per_param(lay.precision)
    shards = lay.dp * lay.cp if lay.distributed_optimizer else 1
    recompute = lay.recompute if lay.recompute != "full" else f"full ({lay.recompute_method}, {lay.recompute_layers})"
    row = lambda label, *values: f"  {label:<40}" + "".join(f"{v:>16}" for v in values)  # noqa: E731
    lines = [
        f"{title}{m.family}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads / "
        f"{m.query_groups} query groups, ffn {m.ffn_hidden_size} ({m.activation}), vocab {m.vocab_size}"
        f"{'' if plan.vocab_size == m.vocab_size else f' (padded {plan.vocab_size})'}"
        f"{', tied embeddings' if m.tie_embeddings else ''}",
        f"layout: {lay.gpus} GPUs = tp {lay.tp} x pp {lay.pp} x cp {lay.cp} x dp {lay.dp}"
        f"{f', vpp {lay.vpp}' if lay.vpp > 1 else ''}, sp {'on' if lay.sp else 'off'}, distributed optimizer "
        f"{'on' if lay.distributed_optimizer else 'off'}, recompute {recompute}, {lay.precision}",
        f"batch: seq {lay.seq_length} x micro-batch {lay.micro_batch} x {lay.num_microbatches} "
        f"micro-batch{'es' * (lay.num_microbatches > 1)} x "
        f"dp {lay.dp}{f', pipeline bubble {lay.bubble:.1%}' if lay.pp > 1 else ''}; "
        f"{'flash' if lay.flash_attention else 'unfused'} attention",
        "",
        "parameters",
        row("total (as built)", f"{pc.total:,}", _si(pc.total)),
        row("published (unpadded vocabulary)", f"{plan.params_published:,}", _si(plan.params_published)),
        row("embedding + output layer", f"{pc.word_embedding + pc.position_embedding + pc.output_layer:,}"),
        "",
        f"{'memory per GPU, GiB':<42}" + "".join(f"{s.stage + ' stage' if s.stage != 'only' else '':>16}"
                                                 for s in plan.memory),
    ]
    gib = lambda attr: [f"{getattr(s, attr) / GiB:.2f}" for s in plan.memory]  # noqa: E731
    lines += [
        row("parameters on the GPU", *[_si(s.params) for s in plan.memory]),
        row(f"weights ({w} B/param)", *gib("weights")),
        row(f"grads (fp32 main grads, {g} B/param)", *gib("grads")),
        row(f"optimizer ({o} B/param{f' / {shards}' if shards > 1 else ''})", *gib("optimizer")),
        row("activations", *gib("activations")),
        row("overhead (allowance)", *gib("overhead")),
    ]
    if any(s.other_models or s.kv_cache for s in plan.memory):
        lines += [row("other models (RL: reference, RM, critic)", *gib("other_models")),
                  row("rollout KV cache (RL)", *gib("kv_cache"))]
    lines += [
        row("total", *gib("total")),
    ]
    headroom = plan.gpu_memory_gib - plan.peak.total / GiB
    verdict = f"yes, {headroom:.1f} GiB headroom" if plan.fits else f"NO, {-headroom:.1f} GiB over"
    lines += [f"  fits in {plan.gpu_memory_gib:g} GiB: {verdict}", ""]
    lines += [
        f"compute for {_si(c.tokens)} tokens",
        row("6·N·D", f"{c.dense_flops:.3e}"),
        row("attention, causal (6·L·s·q·D)", f"{c.attention_flops:.3e}"),
        row("total FLOPs", f"{c.total_flops:.3e}"),
        row(f"GPU-hours at {c.mfu * 100:g}% MFU of {c.peak_tflops:g} TFLOP/s", f"{c.gpu_hours:,.0f}"),
        row("GPU-days", f"{c.gpu_days:,.1f}"),
        row(f"wall-clock days on {c.gpus} GPUs", f"{c.wall_days:,.1f}"),
        row(f"cost at {c.price:g} per GPU-hour" if c.price is not None else "cost (give --price)",
            f"{c.cost:,.0f}" if c.cost is not None else "-"),
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(line.rstrip() for line in lines)
