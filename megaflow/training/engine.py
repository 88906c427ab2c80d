"""The one training engine every stage runs on.

A stage (algorithms/) supplies a `Task`: `forward_step(data_iterator, model) -> (output, loss_func)` in
megatron's schedule convention, where `loss_func(output) -> (loss_sum, num_tokens, {name: [sum, count]})`.
The engine owns the rest: megatron DDP and optimizer, micro-batches through megatron's
forward_backward_func (so pipeline parallelism needs no change here), LR schedule, evaluation,
checkpoints, metrics and the progress bar.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from megaflow.config.schema import StageConfig
from megaflow.errors import RunFailed
from megaflow.models import gpt, manifest, size, weights
from megaflow.runtime import distributed as dist
from megaflow.training import checkpoint, faults
from megaflow.training.metrics import MetricsWriter, open_wandb, peak_flops
from megaflow.training.optimizer import build_optimizer, build_scheduler


class Task:
    """What a stage gives the engine: `forward_step` in megatron's schedule convention, and what the engine
    must know about its batches and model. Subclasses override the attributes that differ."""

    loss_names: tuple[str, ...] = ("loss",)  # keys of the loss dict; the first is the loss that is optimised
    reports_perplexity: bool = False  # the first loss is a per-token cross-entropy: evaluation adds exp(loss)
    rows_per_sample: int = 1  # rows of a micro-batch per sample: 2 for preference pairs (chosen, rejected)
    row_length_factor: int = 1  # rows of this many times data.seq_length: 2 for packed pairs
    head: str = "lm"  # the model's output: "lm" (vocabulary logits) or "scalar" (megaflow.models.gpt)
    progress: tuple[str, ...] = ()  # step metrics the progress bar shows beside the loss (RL: the mean reward)

    def forward_step(self, data_iterator: Iterator, model: torch.nn.Module) -> tuple[torch.Tensor, Callable]:
        raise NotImplementedError


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    tokens_seen: int = 0
    extra: dict = field(default_factory=dict)  # a stage's own state (RL: the KL controller), in every checkpoint


@dataclass
class StepResult:
    """What one step of the loop did: its metrics, the positions and FLOPs it ran (for tok/s and MFU) and
    the samples it consumed (the data position a checkpoint records)."""

    metrics: dict
    positions: int
    flops: float
    samples: int


def data_parallel_rank_and_size() -> tuple[int, int]:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()


def num_microbatches(cfg: StageConfig) -> int:
    """Micro-batches per step on each data-parallel rank (divisibility is checked by StageConfig.check_layout)."""
    _, dp = data_parallel_rank_and_size()
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp)


def build_model(cfg: StageConfig, vocab_size: int, head: str = "lm"):
    """Model chunks (one per virtual pipeline stage) wrapped in megatron DDP, and their TransformerConfig."""
    tcfg = gpt.transformer_config(cfg.model, cfg.parallel, cfg.precision, cfg.fp8_recipe)
    tcfg.calculate_per_token_loss = True
    chunks = gpt.build_gpt_chunks(cfg.model, tcfg, vocab_size, head=head, attention=cfg.attention)
    return gpt.wrap_ddp(chunks, tcfg, cfg.parallel), tcfg


def _reduce_losses(losses: list[dict], names: tuple[str, ...]) -> dict[str, float]:
    """Sum [loss_sum, count] pairs over micro-batches and the world. Only the last pipeline stage holds
    losses, and its TP ranks hold the same ones, so TP rank 0 of that stage contributes for its DP rank;
    every rank gets the same token-weighted means."""
    from megatron.core import parallel_state

    holder = (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
              and parallel_state.get_tensor_model_parallel_rank() == 0)
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=dist.device())
    if holder:
        for d in losses:
            for i, name in enumerate(names):
                totals[i] += d[name].detach().to(totals)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    means = {name: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, name in enumerate(names)}
    return means | {"_tokens": totals[0, 1].item()}


def forward_backward(model, task: Task, data_iterators, n_micro: int, seq: int, mbs: int, forward_only: bool):
    """megatron's schedule (no pipelining, 1F1B or interleaved, as parallel_state says) over one batch;
    `mbs` counts samples and `seq` is data.seq_length: a pipeline sends activations of
    mbs * rows_per_sample rows of seq * row_length_factor positions."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs *= task.rows_per_sample
    seq *= task.row_length_factor
    return get_forward_backward_func()(
        forward_step_func=task.forward_step,
        data_iterator=data_iterators if len(model) > 1 else data_iterators[0],
        model=model,
        num_microbatches=n_micro,
        seq_length=seq,
        micro_batch_size=mbs,
        decoder_seq_length=seq,
        forward_only=forward_only,
    )


@torch.no_grad()
def evaluate(model, task: Task, data_iterators, iters: int, n_micro: int, seq: int, mbs: int) -> dict[str, float]:
    """Token-weighted mean loss (and perplexity, for a language-model loss) over `iters` batches of
    `n_micro` micro-batches, and the means of the task's other reported metrics."""
    for chunk in model:
        chunk.eval()
    losses = []
    for _ in range(iters):
        losses += forward_backward(model, task, data_iterators, n_micro, seq, mbs, forward_only=True)
    for chunk in model:
        chunk.train()
    reduced = _reduce_losses(losses, task.loss_names)
    loss = reduced[task.loss_names[0]]
    others = {k: v for k, v in reduced.items() if k not in (task.loss_names[0], "_tokens")}
    ppl = {"ppl": math.exp(min(loss, 50.0))} if task.reports_perplexity else {}
    return {"loss": loss, **ppl, "tokens": int(reduced["_tokens"])} | others


class TrainingDiverged(RunFailed):
    """Too many consecutive non-finite steps; the CLI reports it in one line and exits non-zero."""


def actual_layout(cfg: StageConfig) -> dict:
    """The parallel layout this process runs with (dp derived from the world), as checkpoints record it."""
    _, dp = data_parallel_rank_and_size()
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "cp": p.cp, "dp": dp, "sp": p.sp,
            "distributed_optimizer": p.distributed_optimizer}


def _grad_buffers(model):
    for chunk in model:
        yield from getattr(chunk, "buffers", [])
        yield from getattr(chunk, "expert_parallel_buffers", [])


def all_finite(loss: float, model) -> bool:
    """The (already world-reduced) loss is finite and no rank holds a NaN/Inf gradient.

    A NaN or Inf anywhere makes the sum of a grad buffer non-finite, so one read of each buffer (no
    boolean copy of the grads), one host sync and one tiny all-reduce decide it, the same on every rank.
    """
    sums = [b.grad_data.sum(dtype=torch.float32) for b in _grad_buffers(model)]
    grads_total = torch.stack(sums).sum() if sums else torch.zeros((), device=dist.device())
    flag = (~torch.isfinite(grads_total)).float().reshape(1)
    if not math.isfinite(loss):
        flag.fill_(1.0)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag.item() == 0.0


def _poison_grads(model) -> None:
    for buffer in _grad_buffers(model):
        buffer.grad_data.fill_(float("nan"))


@contextlib.contextmanager
def _stop_on_signals(trainer: "Trainer"):
    """SIGTERM / SIGUSR1 (SLURM's warnings before a kill) ask for a checkpoint at the next step boundary."""
    def request(signum, frame):
        trainer.stop_signal = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Owns the model, optimizer and schedule of one stage and runs its loop."""

    def __init__(self, cfg: StageConfig, task: Task, vocab_size: int, stage_dir: Path, meta: dict | None = None,
                 data_position: Callable[[int], dict] | None = None, optimizer_steps: int | None = None):
        from megatron.core.distributed import finalize_model_grads

        self.cfg, self.task, self.vocab_size, self.stage_dir = cfg, task, vocab_size, stage_dir
        self.meta = meta or {}  # megaflow.json fields of this stage's checkpoints (model, tokenizer, parents)
        self.data_position = data_position  # consumed samples -> a readable breakdown (per dataset of a blend)
        p = cfg.parallel
        dist.print_rank0(f"model: building {cfg.model.family} h{cfg.model.hidden_size} L{cfg.model.num_layers} "
                         f"(tp={p.tp} pp={p.pp}, {cfg.precision}) and its optimizer")
        self.model, self.tcfg = build_model(cfg, vocab_size, task.head)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, optimizer_steps)
        one = len(self.model) == 1
        self.tcfg.no_sync_func = self.model[0].no_sync if one else [m.no_sync for m in self.model]
        self.tcfg.finalize_model_grads_func = finalize_model_grads
        if cfg.parallel.overlap_grad_reduce:  # the schedule starts each chunk's reduce as its backward ends
            self.tcfg.grad_sync_func = self.model[0].start_grad_sync if one else [m.start_grad_sync for m in self.model]
        self.tcfg.grad_scale_func = self.optimizer.scale_loss
        self.num_microbatches = num_microbatches(cfg)
        self.state = TrainState()
        self.ckpt_root = stage_dir / "checkpoints"
        self.is_writer = dist.is_rank0()
        wandb_run = (open_wandb(cfg.run.wandb, cfg.run.name, cfg.stage, stage_dir, cfg.model_dump(mode="json"))
                     if self.is_writer else None)
        self.metrics = MetricsWriter(stage_dir if self.is_writer else None, cfg.run.tensorboard, wandb_run)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rows = cfg.train.global_batch_size * task.rows_per_sample
        row_length = cfg.data.seq_length * task.row_length_factor
        self.tokens_per_step = rows * row_length  # positions, padding included
        self.flops_per_step = size.flops_per_step(cfg.model, vocab_size, rows, row_length)
        self.peak = peak_flops() * world
        self.layout = actual_layout(cfg)
        self.bad_steps = 0  # consecutive non-finite steps
        self.skipped_total = 0
        self.updates = 0  # optimizer steps applied (an RL iteration takes several): Adam's step count on resume
        self.stop_signal: str | None = None
        self.companions: list[Trainer] = []  # other trainable models of the stage (PPO's critic), saved with it
        self.optimizer_format = checkpoint.optimizer_format(cfg.checkpoint.optimizer_format)
        weights.prepare_saves(cfg.checkpoint.async_save)  # now, rather than as a stall of the first save
        self.async_saves = None
        if cfg.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.async_saves = AsyncCallsQueue()

    # -- one step -------------------------------------------------------------------------------------

    def _forward_backward(self, data_iterators, forward_only: bool) -> list[dict]:
        return forward_backward(self.model, self.task, data_iterators, self.num_microbatches,
                                self.cfg.data.seq_length, self.cfg.train.micro_batch_size, forward_only)

    def train_step(self, data_iterators: list[Iterator]) -> dict[str, float]:
        """Forward and backward over all micro-batches of one global batch, then one optimizer step, unless
        the loss or a gradient is NaN/Inf: then the update is skipped (and counted)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._forward_backward(data_iterators, forward_only=False)
        if faults.armed("nan", self.cfg.stage, self.state.step + 1):
            losses = [{k: v * float("nan") for k, v in d.items()} for d in losses]
            _poison_grads(self.model)
        reduced = _reduce_losses(losses, self.task.loss_names)
        main = self.task.loss_names[0]
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        if all_finite(reduced[main], self.model):
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            self.bad_steps = 0
            self.updates += int(bool(ok))
        else:
            ok, grad_norm = False, float("nan")
            self.bad_steps += 1
            self.skipped_total += 1
        return {
            "loss": reduced[main],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr,
            "update_ok": bool(ok),
            "skipped_total": self.skipped_total,
        } | {k: v for k, v in reduced.items() if k not in (main, "_tokens")}

    @contextlib.contextmanager
    def params_synced(self):
        """With overlap_param_gather the updated parameters are all-gathered lazily by the next forward's
        hooks; evaluation and checkpoints need them now (megatron's training loop does the same)."""
        if not self.cfg.parallel.overlap_param_gather:
            yield
            return
        for chunk in self.model:
            chunk.disable_forward_pre_hook()  # also all-gathers synchronously
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    def evaluate(self, make_iterators: Callable[[], list[Iterator]], iters: int) -> dict[str, float]:
        with self.params_synced():
            return evaluate(self.model, self.task, make_iterators(), iters, self.num_microbatches,
                            self.cfg.data.seq_length, self.cfg.train.micro_batch_size)

    # -- checkpoints ----------------------------------------------------------------------------------

    def save(self, timings: dict | None = None) -> Path:
        for other in self.companions:  # first: a crash between the two leaves theirs one step ahead, never behind
            other.state = TrainState(self.state.step, self.state.consumed_samples, self.state.tokens_seen)
            other.save()
        extra = {"consumed_samples": self.state.consumed_samples, "tokens_seen": self.state.tokens_seen,
                 "skipped_total": self.skipped_total, "updates": self.updates, "state": self.state.extra}
        if self.data_position is not None:
            extra["consumed_per_dataset"] = self.data_position(self.state.consumed_samples)
        meta = {**self.meta, "stage": self.cfg.stage, "step": self.state.step, "tokens_seen": self.state.tokens_seen,
                "consumed_samples": self.state.consumed_samples, "parallel_at_save": self.layout,
                "optimizer_format": self.optimizer_format,
                **({"consumed_per_dataset": extra["consumed_per_dataset"]} if "consumed_per_dataset" in extra else {})}
        with self.params_synced():
            return checkpoint.save_checkpoint(self.ckpt_root, self.state.step, self.model, self.optimizer,
                                              self.scheduler, extra, meta, keep=self.cfg.checkpoint.keep,
                                              stage=self.cfg.stage, async_queue=self.async_saves, timings=timings)

    def init_weights_from(self, ckpt: str | Path) -> None:
        """Start from another checkpoint's weights (saved in any layout); the optimizer's main (fp32)
        copies of the parameters follow. A scalar-head model starting from a language model keeps its
        own freshly initialised head."""
        head = self.task.head
        other_head = weights.read_meta(ckpt).get("head", "lm") != head
        weights.load_weights(ckpt, self.model, skip_output_layer=other_head)
        self.optimizer.reload_model_params()
        dist.print_rank0(f"initialised weights from {ckpt}")

    def maybe_resume(self) -> bool:
        """Continue from the newest usable checkpoint (a corrupt one falls back to the one before)."""
        ckpt = checkpoint.find_resumable(self.ckpt_root, warn=dist.print_rank0) if self.cfg.checkpoint.resume else None
        if ckpt is None:
            self.metrics.truncate_after(0)  # a fresh start: records of an earlier attempt do not belong
            return False
        extra = checkpoint.load_checkpoint(ckpt, self.model, self.optimizer, self.scheduler, self.layout,
                                           warn=dist.print_rank0)
        self.state = TrainState(extra["step"], extra["consumed_samples"], extra.get("tokens_seen", 0),
                                dict(extra.get("state", {})))
        self.skipped_total = extra.get("skipped_total", 0)
        self.updates = extra.get("updates", self.state.step - self.skipped_total)
        self.metrics.truncate_after(self.state.step)
        dist.print_rank0(f"resumed from {ckpt} at step {self.state.step}")
        return True

    def resume_companion(self, other: "Trainer") -> bool:
        """Load `other`'s checkpoint of this trainer's step (a companion saved with it); False on a fresh start."""
        if self.state.step == 0:
            return False
        ckpt = other.ckpt_root / f"iter_{self.state.step:07d}"
        problem = manifest.verify(ckpt) if ckpt.is_dir() else f"{ckpt} is missing"
        if problem is not None:
            raise RunFailed(f"resuming step {self.state.step}: the checkpoint of {other.stage_dir.name} is not usable "
                            f"({problem}); move {self.ckpt_root} away to start over")
        extra = checkpoint.load_checkpoint(ckpt, other.model, other.optimizer, other.scheduler, other.layout,
                                           warn=dist.print_rank0)
        other.state = TrainState(self.state.step, self.state.consumed_samples, self.state.tokens_seen)
        other.skipped_total, other.updates = extra.get("skipped_total", 0), extra.get("updates", 0)
        dist.print_rank0(f"resumed {other.stage_dir.name} from {ckpt}")
        return True

    # -- the loop -------------------------------------------------------------------------------------

    def step(self, iterators: list[Iterator]) -> StepResult:
        """One step of the loop: one optimizer step over a global batch (an RL stage's `step` hook does a
        whole iteration: rollouts, scores, then its updates)."""
        m = self.train_step(iterators)
        positions, flops = self._step_work(iterators)
        return StepResult(m, positions, flops, self.cfg.train.global_batch_size)

    def train(self, make_train_iterators: Callable[[int], list[Iterator]],
              make_valid_iterators: Callable[[], list[Iterator]] | None,
              step: Callable[["Trainer", list[Iterator]], StepResult] | None = None) -> str:
        """Run to `train.steps`, each step `step(self, iterators)` (default: Trainer.step). Returns "done",
        or "stopped" when a signal (SIGTERM/SIGUSR1) or `train.max_minutes` ended the run early after
        saving a checkpoint to resume from."""
        cfg = self.cfg
        iterators = make_train_iterators(self.state.consumed_samples)
        start_time = time.time()
        bar = tqdm(total=cfg.train.steps, initial=self.state.step, desc=cfg.stage, dynamic_ncols=True,
                   disable=not (self.is_writer and cfg.run.progress))
        self.last_eval = {}
        with _stop_on_signals(self):
            while self.state.step < cfg.train.steps:
                t0 = time.perf_counter()
                done = step(self, iterators) if step is not None else self.step(iterators)
                dt = time.perf_counter() - t0
                m, positions, flops = done.metrics, done.positions, done.flops
                self.state.step += 1
                self.state.consumed_samples += done.samples
                self.state.tokens_seen += positions
                m |= {"step_time": dt, "tok_per_s": positions / dt, "mfu": flops / dt / self.peak,
                      "tokens_seen": self.state.tokens_seen}
                if dist.device().type == "cuda":  # compare with `megaflow plan`
                    m["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if self.state.step % cfg.run.log_every == 0 or self.state.step == cfg.train.steps:
                    self.metrics.log(self.state.step, m)
                bar.update(1)
                shown = {k.split("/")[0]: f"{m[k]:.3f}" for k in self.task.progress if k in m}
                bar.set_postfix(loss=f"{m['loss']:.4f}", **shown, tok_s=f"{m['tok_per_s']:.0f}", mfu=f"{100 * m['mfu']:.1f}%")
                self._after_step(bar, make_valid_iterators)
                if self._should_stop(start_time):
                    bar.close()
                    self.save()
                    checkpoint.finalize_saves(self.async_saves, blocking=True)
                    dist.print_rank0(f"{self.stop_reason} at step {self.state.step}: checkpoint saved, exiting to resume later")
                    return "stopped"
        bar.close()
        checkpoint.finalize_saves(self.async_saves, blocking=True)  # a save in flight is finished before we go on
        return "done"

    def _step_work(self, iterators: list[Iterator]) -> tuple[int, float]:
        """Positions (padding included) and FLOPs of the step just taken, over all ranks: full rows of
        seq_length, unless the iterators cut padding (megaflow.data.sampler.MicroBatches.take_shapes):
        then the shapes that ran, summed over the data-parallel replicas."""
        shapes = Counter()
        for it in iterators:
            shapes.update(it.take_shapes())
        if not shapes:
            return self.tokens_per_step, self.flops_per_step
        work = torch.tensor([sum(n * rows * length for (rows, length), n in shapes.items()),
                             sum(n * size.flops_per_step(self.cfg.model, self.vocab_size, rows, length)
                                 for (rows, length), n in shapes.items())], dtype=torch.float64)
        dist.sum_over_data_parallel(work)
        return int(work[0]), float(work[1])

    def _after_step(self, bar, make_valid_iterators) -> None:
        cfg, step = self.cfg, self.state.step
        if self.bad_steps >= cfg.train.max_bad_steps:
            raise TrainingDiverged(
                f"{self.bad_steps} consecutive steps with a NaN/Inf loss or gradient (train.max_bad_steps) at step "
                f"{step}: stopping; the last good checkpoint is kept"
            )
        if make_valid_iterators and cfg.eval.every and step % cfg.eval.every == 0:
            self.last_eval = self.evaluate(make_valid_iterators, cfg.eval.iters)
            self.metrics.log(step, self.last_eval, prefix="valid")
            if self.is_writer:
                ppl = f" ppl {self.last_eval['ppl']:.2f}" if "ppl" in self.last_eval else ""
                bar.write(f"step {step}: valid loss {self.last_eval['loss']:.4f}{ppl}")
        t0 = time.perf_counter()
        if checkpoint.finalize_saves(self.async_saves):  # publish background saves that have finished
            # the manifest's checksums and the rename run here, in the training process: a stall too
            self.metrics.log(step, {"publish_s": time.perf_counter() - t0}, prefix="checkpoint")
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            t0, timings = time.perf_counter(), {}
            self.save(timings)
            # how long training waited: the whole save, or only the staging of an asynchronous one
            self.metrics.log(step, {"stall_s": time.perf_counter() - t0, "async": self.async_saves is not None,
                                    **timings}, prefix="checkpoint")
        if faults.armed("kill", cfg.stage, step):
            faults.kill_self()
        if faults.armed("sigterm", cfg.stage, step):
            faults.kill_self(signal.SIGTERM)
        if faults.armed("pause", cfg.stage, step):
            faults.pause_until(lambda: self.stop_signal is not None, step)

    def _should_stop(self, start_time: float) -> bool:
        """A stop request on any rank (signal) or rank 0's clock stops every rank at the same step."""
        out_of_time = bool(self.cfg.train.max_minutes) and (time.time() - start_time) / 60 >= self.cfg.train.max_minutes
        flags = torch.tensor([float(self.stop_signal is not None), float(out_of_time and dist.is_rank0())],
                             device=dist.device())
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        if flags[0] > 0:
            self.stop_reason = f"stop requested ({self.stop_signal or 'signal on another rank'})"
        elif flags[1] > 0:
            self.stop_reason = f"train.max_minutes ({self.cfg.train.max_minutes}) reached"
        return bool(flags.sum() > 0) and self.state.step < self.cfg.train.steps

    def write_json(self, name: str, payload: dict) -> None:
        if self.is_writer:
            (self.stage_dir / name).write_text(json.dumps(payload, indent=2) + "\n")

    def close(self) -> None:
        for other in self.companions:
            other.close()
        if self.async_saves is not None:
            self.async_saves.close()
        self.metrics.close()
