"""megatron's optimizer (plain or distributed) and its LR / weight-decay scheduler from a TrainConfig."""

from __future__ import annotations

from megaflow.config.schema import StageConfig


def build_optimizer(cfg: StageConfig, model_chunks):
    """Adam(W) over the model chunks; fp32 main params and grads when training in bf16."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = cfg.train
    bf16 = cfg.precision in ("bf16", "fp8")
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=bf16,
        params_dtype=model_chunks[0].config.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    return get_megatron_optimizer(opt_cfg, model_chunks)


def build_scheduler(cfg: StageConfig, optimizer, steps: int | None = None):
    """Linear warmup, then cosine / linear / constant decay to `train.min_lr`, or WSD (warmup-stable-decay)
    whose decay phase is the last `train.wsd_decay_steps` (default: 10% of the steps). `steps` counts
    optimizer steps (default train.steps; an RL iteration takes several)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.train
    total = steps or t.steps
    style = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}[t.schedule]
    wsd_steps = t.wsd_decay_steps if t.wsd_decay_steps is not None else max(1, total // 10)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=total,
        lr_decay_style=style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        wsd_decay_steps=wsd_steps if style == "WSD" else None,
        lr_wsd_decay_style=t.wsd_decay_style if style == "WSD" else None,
    )
