"""Online RL (PPO, GRPO): the policy generates, a reward scores, the policy is updated; every model lives
in this job, on the weights being trained, so there is no rollout engine to refit or drift from.

One iteration (one step of the engine's loop, `train.steps` of them; megaflow.training.engine.Trainer.train
with this module's `Iteration` as its step):

    prompts   rl.prompts_per_step from the prompt stream (the checkpoint's `consumed_samples` is its cursor),
              split over the data-parallel replicas
    rollout   rl.group_size samples per prompt, KV-cache sampling from the actor's live weights
              (megaflow.inference.generate), with the behaviour log-probs of logits / temperature
    gather    every replica gets every rollout (token ids only), in prompt order
    score     a reward function in worker processes (rank 0), or the reward model (a forward pass)
    passes    the actor's training forward (old log-probs, entropy), the reference's, the critic's values
              (megaflow.training.collect: forward-only, any TP/PP/DP layout)
    check     the gap between behaviour and training log-probs (k3, max ratio): a metric and a gate
    advantage GAE (ppo), group-normalised (grpo, Dr. GRPO), RLOO or REINFORCE++ (rl_losses.py)
    update    rl.epochs passes over the rollouts in optimizer steps of train.global_batch_size sequences:
              the actor's clipped surrogate (+ KL loss, - entropy bonus), the critic's clipped value loss

A sample whose reward failed (raised, hung, returned a non-number) or, with `rl.overlong: mask`, whose
response was cut at max_new_tokens carries no loss; its group's statistics use the others.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megaflow.algorithms import rl_losses as L
from megaflow.algorithms.base import Work, pad_multiple
from megaflow.algorithms.rollouts import (ActorTask, CriticTask, RolloutDataset, collate, last_values,
                                          on_device, token_logps, values_of)
from megaflow.algorithms.runner import TrainingStage
from megaflow.config import StageConfig
from megaflow.data.chat import ChatTemplate, chat_tokenizer
from megaflow.data.prompts import Prompt, PromptDataOptions, load_prompts
from megaflow.data.records import DataSummary, files_key
from megaflow.data.sampler import MicroBatches
from megaflow.errors import RunFailed, UserError
from megaflow.models import size
from megaflow.runtime import distributed as dist
from megaflow.training import faults, init_from
from megaflow.training.collect import collect
from megaflow.training.engine import StepResult, Trainer, data_parallel_rank_and_size

class RewardFailed(RunFailed):
    """More reward calls failed than rl.reward.max_failure_rate allows."""


class LogprobGap(RunFailed):
    """The rollout's log-probs and the training forward's of the same tokens are too far apart."""



# --- the stage -----------------------------------------------------------------------------------


class RLStage(TrainingStage):
    """What PPO and GRPO share; a subclass sets `algorithm` ("ppo" or "grpo")."""

    algorithm = "grpo"

    def advantage(self, cfg: StageConfig) -> str:
        return cfg.rl.advantage or ("gae" if self.algorithm == "ppo" else "grpo")

    def inputs(self, cfg: StageConfig) -> dict[str, str]:
        out = super().inputs(cfg) | {f"data.prompts.valid[{i}]": p for i, p in enumerate(cfg.data.prompts.valid)}
        r = cfg.rl
        if r.reward is not None and r.reward.model:
            out["rl.reward.model"] = r.reward.model
        if r.reward is not None and r.reward.function and ":" in r.reward.function:
            out["rl.reward.function"] = r.reward.function.rpartition(":")[0]
        if r.reference_from:
            out["rl.reference_from"] = r.reference_from
        if self.algorithm == "ppo" and r.critic_from:
            out["rl.critic_from"] = r.critic_from
        return out

    def check(self, cfg: StageConfig) -> None:
        if not cfg.data.train:
            raise UserError(f"data.train: no prompts given ({self.name} generates answers to prompts)")
        super().check(cfg)
        r, t, p = cfg.rl, cfg.train, cfg.parallel
        if r.reward is None:
            raise UserError(f"rl.reward: the {self.name} stage needs a reward: rl.reward.model (a reward-model "
                            "checkpoint) or rl.reward.function (file.py:name, exact_match or words)")
        if r.reward.function:
            from megaflow.eval.verifiers import check_spec

            check_spec(r.reward.function)
        adv = self.advantage(cfg)
        if self.algorithm == "ppo" and adv == "gae" and not (r.critic_from or r.reward.model):
            raise UserError("rl.critic_from: PPO's critic starts from a reward model (or another checkpoint); set "
                            "rl.critic_from, or use rl.reward.model")
        if self.algorithm == "grpo" and adv == "gae":
            raise UserError("rl.advantage=gae needs a critic: use the ppo stage (grpo: grpo, rloo or reinforce_pp)")
        if adv in ("grpo", "rloo") and r.group_size < 2:
            raise UserError(f"rl.group_size={r.group_size}: group advantages ({adv}) need at least 2 samples per prompt")
        n = r.prompts_per_step * r.group_size
        if n % t.global_batch_size:
            raise UserError(f"train.global_batch_size ({t.global_batch_size}) must divide the rollouts of an iteration "
                            f"(rl.prompts_per_step * rl.group_size = {n})")
        if cfg.data.seq_length <= r.max_new_tokens:
            raise UserError(f"data.seq_length ({cfg.data.seq_length}) must exceed rl.max_new_tokens "
                            f"({r.max_new_tokens}): it holds the prompt and the response")
        if cfg.eval.every:
            raise UserError(f"eval.every: the {self.name} stage evaluates its held-out prompts before and after "
                            "training (data.prompts.valid); set eval.every=0")
        if p.vpp and p.vpp > 1:
            raise UserError("parallel.vpp: rollouts run on one model chunk per rank; the RL stages do not support "
                            "the interleaved pipeline")
        if p.cp > 1:
            raise UserError("parallel.cp: the RL stages do not support context parallelism yet")

    def check_init(self, cfg: StageConfig) -> None:
        super().check_init(cfg)
        r = cfg.rl
        if r.reference_from:
            init_from.check_spec(r.reference_from, key="rl.reference_from")
        if r.reward is not None and r.reward.model:
            init_from.check_spec(r.reward.model, key="rl.reward.model", language_model=False)

    def prepare(self, cfg: StageConfig, tokenizer, tokenizer_dir: str, init_dir: Path | None) -> Work:
        opts = PromptDataOptions.from_config(cfg.data.prompts, seq_length=cfg.data.seq_length,
                                             invalid_utf8=cfg.data.invalid_utf8)
        tokenizer, source, added = chat_tokenizer(tokenizer, opts.chat_template)
        vocab = init_from.adopt(cfg, init_dir, tokenizer.vocab_size, log=dist.print_rank0)
        if added:
            raise UserError(f"data.prompts.chat_template: the template adds tokens {added} that the model from "
                            f"{cfg.init_from} never learned; use the SFT stage's template (the tokenizer's own)")
        template = ChatTemplate(tokenizer, source)
        summary = DataSummary()
        paths = [src.path for src in cfg.data.train]
        dist.print_rank0(f"data: reading prompts {files_key('data.train', paths)}")
        train = load_prompts(paths, template, opts, cfg.rl.max_new_tokens, summary, files_key("data.train", paths))
        held_out = []
        if cfg.data.prompts.valid:
            held_out = load_prompts(cfg.data.prompts.valid, template, opts, cfg.rl.max_new_tokens, DataSummary(),
                                    files_key("data.prompts.valid", cfg.data.prompts.valid))
        _, dp = data_parallel_rank_and_size()
        if cfg.rl.prompts_per_step % dp:
            raise UserError(f"rl.prompts_per_step ({cfg.rl.prompts_per_step}) must be divisible by the data-parallel "
                            f"size ({dp}): each replica generates for its share")
        dist.print_rank0(f"{len(train)} prompts ({summary.dropped_too_long} too long for seq_length - max_new_tokens), "
                         f"{len(held_out)} held out")
        updates = cfg.rl.epochs * cfg.rl.prompts_per_step * cfg.rl.group_size // cfg.train.global_batch_size
        iteration = Iteration(self, cfg, tokenizer, init_dir, held_out, vocab)
        task = ActorTask(cfg.rl, cfg.rl.max_new_tokens)
        return Work(task, vocab, tokenizer, train, None, prompt_iterators(cfg), step=iteration,
                    optimizer_steps=cfg.train.steps * updates,
                    result={"data": {"prompts": len(train), "held_out": len(held_out),
                                     "dropped_too_long": summary.dropped_too_long}},
                    extra={"iteration": iteration})

    def after_train(self, trainer: Trainer, work: Work) -> dict:
        iteration = work.extra["iteration"]
        out = iteration.before_eval(trainer) | iteration.held_out_eval(trainer, "valid") if trainer.cfg.eval.final else {}
        iteration.close()
        return out


def prompt_iterators(cfg: StageConfig):
    """The prompt stream: this replica's share of rl.prompts_per_step prompts per step, in a seeded order
    per epoch over the prompts (megaflow.data.sampler.MicroBatches; `consumed` counts prompts)."""
    def make(prompts, n_chunks: int, consumed: int, shuffle: bool) -> list:
        dp_rank, dp_size = data_parallel_rank_and_size()
        share = cfg.rl.prompts_per_step // dp_size
        return [MicroBatches(prompts, share, dp_rank, dp_size, consumed, cfg.train.seed, shuffle, collate=list)]
    return make


def _prompt_text(p: Prompt) -> str:
    users = [m["content"] for m in p.messages if m["role"] == "user"]
    return users[-1] if users else ""


@dataclass
class Scores:
    values: torch.Tensor  # [n] float, NaN where the reward failed
    failures: dict
    examples: list


class Iteration:
    """One RL iteration, the engine loop's `step`; holds what the stage builds on first use: the
    rollout view of the actor, the reference, the reward, the critic (PPO) and the KL controller."""

    def __init__(self, stage: RLStage, cfg: StageConfig, tokenizer, init_dir: Path, held_out: list[Prompt], vocab: int):
        self.stage, self.cfg, self.tokenizer, self.init_dir, self.held_out = stage, cfg, tokenizer, init_dir, held_out
        self.vocab = vocab
        self.advantage = stage.advantage(cfg)
        self.ready = False
        self.critic: Trainer | None = None

    # -- built on first use (after the actor's weights are loaded or resumed) -------------------------

    def setup(self, trainer: Trainer) -> None:
        from megaflow.algorithms.reference import ReferenceModel
        from megaflow.inference import InferenceModel

        cfg, r = self.cfg, self.cfg.rl
        self.policy = InferenceModel.from_chunks(trainer.model, self.tokenizer, vocab_size=self.tokenizer.vocab_size,
                                                 max_sequence_length=cfg.model.max_position_embeddings)
        ref_dir = init_from.resolve_init_from(r.reference_from, log=dist.print_rank0) if r.reference_from else self.init_dir
        self.reference = _offload(ReferenceModel(cfg, self.vocab, ref_dir), r.offload)
        self.reward_fn, self.reward_model = None, None
        if r.reward.function:
            from megaflow.eval.verifiers import RewardFunction

            # loaded on every rank (a broken file is one line everywhere); only rank 0 starts workers and calls it
            self.reward_fn = RewardFunction(r.reward.function, r.reward.workers, r.reward.timeout)
        else:
            self.reward_model = _offload(self._frozen_scalar(r.reward.model, "rl.reward.model"), r.offload)
        self.kl = L.KLController(trainer.state.extra.get("kl_coef", r.kl_penalty_coef), r.kl_target, r.kl_horizon)
        if self.advantage == "gae":
            self.critic = self._critic(trainer)
        self.ready = True

    def _frozen_scalar(self, spec: str, key: str):
        from megaflow.algorithms.reference import ReferenceModel
        from megaflow.config.schema import ModelConfig
        from megaflow.models.weights import read_meta

        path = init_from.resolve_init_from(spec, log=dist.print_rank0)
        meta = read_meta(path)
        if meta.get("head") != "scalar":
            raise UserError(f"{key}: {spec} is not a reward model (its megaflow.json has no \"head\": \"scalar\")")
        return ReferenceModel(self.cfg, int(meta["padded_vocab_size"]), path, head="scalar",
                              model=ModelConfig(**meta["model"]))

    def _critic(self, actor: Trainer) -> Trainer:
        """The critic: a scalar-head model with its own optimizer, started from rl.critic_from (default the
        reward model), saved and resumed with the actor (Trainer.companions)."""
        from megaflow.config.schema import ModelConfig
        from megaflow.models.weights import read_meta

        r = self.cfg.rl
        path = init_from.resolve_init_from(r.critic_from or r.reward.model, log=dist.print_rank0)
        meta = read_meta(path)
        ccfg = self.cfg.model_copy(deep=True)
        ccfg.model = ModelConfig(**meta["model"])
        ccfg.stage = f"{self.cfg.stage}-critic"  # its checkpoints' name, and no fault meant for the actor
        ccfg.run.wandb, ccfg.run.tensorboard = None, False  # its metrics go into the actor's, as critic/*
        ccfg.checkpoint.keep = self.cfg.checkpoint.keep + 1  # the one at the actor's step survives a crash between saves
        if r.critic_lr:
            ccfg.train.lr = r.critic_lr
        task = CriticTask(r, r.max_new_tokens)
        updates = r.epochs * r.prompts_per_step * r.group_size // ccfg.train.global_batch_size
        critic = Trainer(ccfg, task, int(meta["padded_vocab_size"]), actor.stage_dir / "critic",
                         meta={"head": "scalar", "model": meta["model"], "padded_vocab_size": meta["padded_vocab_size"]},
                         optimizer_steps=ccfg.train.steps * updates)
        if not actor.resume_companion(critic):
            critic.init_weights_from(path)
        actor.companions.append(critic)
        return critic

    def close(self) -> None:
        if self.ready and self.reward_fn is not None:
            self.reward_fn.close()

    # -- the parts of an iteration ------------------------------------------------------------------

    def _params(self, greedy: bool = False):
        from megaflow.inference.generate import SamplingParams

        r = self.cfg.rl
        return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                              greedy=greedy, stop_strings=list(r.stop_strings), scaled_logprobs=True)

    def rollout(self, trainer: Trainer, prompts: list[Prompt], first_index: int, round_: int = 0) -> list[dict]:
        """This replica's samples: group_size per prompt, each row seeded by (seed, step, round, its global
        index), so a data-parallel split samples what one process does."""
        from megaflow.inference.generate import generate

        g = self.cfg.rl.group_size
        ids = [p.ids for p in prompts for _ in range(g)]
        base = (self.cfg.train.seed * 1_000_003 + trainer.state.step * 7_919 + round_ * 104_729) * 4_096 % 2**62
        seeds = [base + first_index * g + i for i in range(len(ids))]
        with trainer.params_synced():
            done = generate(self.policy, ids, self._params(), row_seeds=seeds)
        return [{"prompt": p, "prompt_ids": c.prompt_ids, "token_ids": c.token_ids, "logprobs": c.logprobs,
                 "text": c.text, "finish_reason": c.finish_reason}
                for p, c in zip((p for p in prompts for _ in range(g)), done)]

    def score(self, rollouts: list[dict]) -> Scores:
        """The reward of every rollout, on every rank: NaN where the function failed."""
        if self.reward_model is not None:  # rows whose tokens are the whole sequence, end of turn included
            pad = self.tokenizer.pad_id
            whole = RolloutDataset([x["prompt_ids"] + x["token_ids"] + [pad] for x in rollouts],
                                   [len(x["prompt_ids"]) for x in rollouts], self.cfg.data.seq_length, pad)
            with _resident(self.reward_model, self.cfg.rl.offload):
                values = collect(self.reward_model.chunks, whole, last_values, on_device, self.cfg.train.micro_batch_size,
                                 self.cfg.data.seq_length, collate(pad_multiple(self.cfg)))
            return Scores(values.double(), {}, [])
        packed = None
        if dist.is_rank0():
            res = self.reward_fn([_prompt_text(x["prompt"]) for x in rollouts], [x["text"] for x in rollouts],
                                 [x["prompt"].answer for x in rollouts], [x["prompt"].fields for x in rollouts])
            packed = ([float("nan") if v is None else v for v in res.values], dict(res.failures), res.examples)
        values, failures, examples = dist.broadcast_from_rank0(packed)
        return Scores(torch.tensor(values, dtype=torch.float64), failures, examples)

    def sample_round(self, trainer: Trainer, iterators: list, round_: int, times: dict) -> tuple[list[dict], Scores]:
        """rl.prompts_per_step prompts from the stream, group_size samples each, every rollout on every rank."""
        t0 = time.perf_counter()
        prompts = next(iterators[0])
        dp_rank, _ = data_parallel_rank_and_size()
        local = self.rollout(trainer, prompts, dp_rank * len(prompts), round_)
        rollouts = [x for part in dist.gather_over_data_parallel(local) for x in part]
        times["generate"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = self.score(rollouts)
        times["score"] += time.perf_counter() - t0
        return rollouts, scores

    def sample(self, trainer: Trainer, iterators: list, times: dict) -> tuple[list[dict], Scores, int]:
        """One round of rollouts; with rl.dynamic_sampling (DAPO), groups whose scores all tie (no signal
        for a group advantage) are replaced by informative groups of up to rl.max_resample more rounds,
        the iteration keeping rl.prompts_per_step groups (tied ones fill what is still missing)."""
        r = self.cfg.rl
        rollouts, scores = self.sample_round(trainer, iterators, 0, times)
        rounds = 1
        if not r.dynamic_sampling:
            return rollouts, scores, rounds
        g = r.group_size

        def split(rolls, sc):
            groups = [(rolls[i:i + g], sc.values[i:i + g]) for i in range(0, len(rolls), g)]
            tied = [x for x in groups if _tied(x[1])]
            return [x for x in groups if not _tied(x[1])], tied

        informative, tied = split(rollouts, scores)
        failures, examples = dict(scores.failures), list(scores.examples)
        while len(informative) < r.prompts_per_step and rounds <= r.max_resample:
            more, more_scores = self.sample_round(trainer, iterators, rounds, times)
            rounds += 1
            new_informative, new_tied = split(more, more_scores)
            informative += new_informative
            tied += new_tied
            for k, n in more_scores.failures.items():
                failures[k] = failures.get(k, 0) + n
            examples += more_scores.examples
        kept = (informative + tied)[:r.prompts_per_step]
        rollouts = [x for rolls, _ in kept for x in rolls]
        values = torch.cat([v for _, v in kept])
        return rollouts, Scores(values, failures, examples[:5]), rounds

    def _passes(self, trainer: Trainer, ds: RolloutDataset, model_chunks, compute) -> torch.Tensor:
        with trainer.params_synced():
            return collect(model_chunks, ds, compute, on_device, self.cfg.train.micro_batch_size,
                           self.cfg.data.seq_length, collate(pad_multiple(self.cfg)))

    def __call__(self, trainer: Trainer, iterators: list) -> StepResult:
        """One iteration: rollouts and scores, forward passes, advantages, updates; its metrics."""
        cfg, r = self.cfg, self.cfg.rl
        if not self.ready:
            self.setup(trainer)
            if cfg.eval.final:
                self.before_eval(trainer)
        iteration = trainer.state.step + 1
        times = {"generate": 0.0, "score": 0.0}
        rollouts, scores, rounds = self.sample(trainer, iterators, times)
        ds = RolloutDataset([x["prompt_ids"] + x["token_ids"] for x in rollouts], [len(x["prompt_ids"]) for x in rollouts],
                            cfg.data.seq_length, self.tokenizer.pad_id)
        failed = self.check_rewards(scores, iteration)
        if faults.armed("kill_in_step", cfg.stage, iteration):
            faults.kill_self()
        behaviour = _behaviour_logps(rollouts, ds.response_mask.shape)
        old_logps, entropy, ref_logps = self.log_probs(trainer, ds, times)
        gap = self.check_gap(behaviour, old_logps, ds.response_mask, iteration)
        truncated = torch.tensor([x["finish_reason"] == "length" for x in rollouts])
        kl_tokens = self.advantages(trainer, ds, scores.values, failed, truncated, old_logps, ref_logps, times)
        ds.rows["is_weight"] = L.truncated_is_weights(old_logps, behaviour, ds.response_mask, r.tis, r.tis_cap)
        t0 = time.perf_counter()
        actor_m, critic_m = self.update(trainer, ds)
        times["train"] = time.perf_counter() - t0
        seq_kl = float(kl_tokens.sum(1).mean())
        self.kl.update(seq_kl, len(rollouts))
        trainer.state.extra["kl_coef"] = self.kl.value

        resp, n_tokens = ds.response_mask, ds.response_mask.sum().clamp(min=1)
        groups = self._fill_failed(scores.values, failed).reshape(-1, r.group_size)
        ok = scores.values[~failed]
        m = {"loss": actor_m.pop("actor loss", float("nan")),
             "reward/mean": float(ok.mean()) if len(ok) else float("nan"),
             "reward/std": float(ok.std()) if len(ok) > 1 else 0.0,
             "reward/failure_rate": float(failed.float().mean()),
             "kl/ref": float(kl_tokens.sum() / n_tokens), "kl/ref_seq": seq_kl, "kl/coef": self.kl.value,
             "entropy": float((entropy * resp).sum() / n_tokens),
             "response/length": float(resp.sum(1).mean()), "response/truncated": float(truncated.float().mean()),
             "groups/zero_variance": float((groups.max(1).values == groups.min(1).values).float().mean())
             if r.group_size > 1 else 0.0,
             "gen_tok_per_s": sum(len(x["token_ids"]) for x in rollouts) / max(times["generate"], 1e-9),
             "rollout_rounds": rounds} | gap
        m |= {f"time/{k}": v for k, v in times.items()} | actor_m | critic_m
        if "returns" in ds.rows:
            m["explained_variance"] = _explained_variance(ds.rows["old_values"], ds.rows["returns"], ds.rows["train_mask"])
        m |= {f"reward/failed_{kind.replace(' ', '_')}": n for kind, n in scores.failures.items()}
        positions = sum(ds.lengths)
        flops = size.flops_per_step(cfg.model, self.vocab, len(ds), positions / len(ds))
        passes = r.epochs + (2 + ("returns" in ds.rows)) / 3  # updates, plus forward-only passes and generation
        return StepResult(m, positions, flops * passes, r.prompts_per_step * rounds)

    def check_rewards(self, scores: Scores, iteration: int) -> torch.Tensor:
        """Which calls failed [n]; a line on failures, and RewardFailed past rl.reward.max_failure_rate."""
        failed = torch.isnan(scores.values)
        if not failed.any():
            return failed
        kinds = ", ".join(f"{k} {n}" for k, n in scores.failures.items())
        examples = "; ".join(_first_of_each_kind(scores.examples))
        dist.print_rank0(f"reward: {int(failed.sum())} of {len(failed)} calls failed at iteration {iteration} ({kinds}): "
                         f"{examples}")
        limit = self.cfg.rl.reward.max_failure_rate
        if float(failed.float().mean()) > limit:
            raise RewardFailed(f"rl.reward: {int(failed.sum())} of {len(failed)} reward calls failed at iteration "
                               f"{iteration} ({kinds}; {examples}), more than rl.reward.max_failure_rate={limit}")
        return failed

    def log_probs(self, trainer: Trainer, ds: RolloutDataset, times: dict) -> tuple[torch.Tensor, ...]:
        """The actor's training forward (pi_old and its entropy) and the reference's, at the response tokens."""
        r, resp = self.cfg.rl, ds.response_mask
        t0 = time.perf_counter()
        old = self._passes(trainer, ds, trainer.model, token_logps(r.temperature, True))
        times["actor_forward"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with _resident(self.reference, r.offload):
            ref = self._passes(trainer, ds, self.reference.chunks, token_logps(r.temperature, False))
        times["reference"] = time.perf_counter() - t0
        return old[..., 0] * resp, old[..., 1], ref * resp

    def check_gap(self, behaviour: torch.Tensor, old_logps: torch.Tensor, resp: torch.Tensor, iteration: int) -> dict:
        """The rollout's log-probs against the training forward's: k3 per token (float64: k3 of a 1e-6 gap is
        ~1e-12) and the largest token ratio; LogprobGap past rl.max_logprob_gap."""
        k3 = float((L.kl_estimate(behaviour, old_logps.double(), "k3") * resp).sum() / resp.sum().clamp(min=1))
        max_ratio = float(torch.exp(((old_logps - behaviour) * resp).abs().max()))
        limit = self.cfg.rl.max_logprob_gap
        if limit is not None and k3 > limit:
            raise LogprobGap(f"rollout and training log-probs differ: k3 {k3:.3g} per token (max ratio {max_ratio:.4f}) "
                             f"> rl.max_logprob_gap={limit} at iteration {iteration}; use precision=fp32, rl.tis=token, "
                             "or raise the threshold")
        return {"logprob_gap/k3": k3, "logprob_gap/max_ratio": max_ratio}

    def advantages(self, trainer: Trainer, ds: RolloutDataset, scores: torch.Tensor, failed: torch.Tensor,
                   truncated: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor, times: dict) -> torch.Tensor:
        """The rows' train_mask, log-probs, advantages (and PPO's returns and old values); returns the per-token
        KL of the penalty's estimator."""
        r, resp = self.cfg.rl, ds.response_mask
        train_mask = resp.clone()
        train_mask[failed] = 0
        if r.overlong == "mask":
            train_mask[truncated] = 0
        filled = self._fill_failed(scores, failed)
        kl_tokens = L.kl_estimate(old_logps, ref_logps, r.kl_penalty_estimator) * resp
        if self.advantage in ("grpo", "rloo"):
            advantages = L.group_advantages(filled, r.group_size, self.advantage, r.std_normalize)[:, None] * resp
        else:
            rewards = L.token_rewards(filled, resp, kl_tokens, self.kl.value)
            if self.advantage == "reinforce_pp":
                advantages = L.whiten(L.discounted_returns(rewards, resp, r.gamma), train_mask)
            else:
                t0 = time.perf_counter()
                values = self._passes(trainer, ds, self.critic.model, values_of) * resp
                times["critic"] = time.perf_counter() - t0
                advantages, returns = L.gae(rewards, values, resp, r.gamma, r.lam)
                if r.whiten_advantages:
                    advantages = L.whiten(advantages, train_mask)
                ds.rows["returns"], ds.rows["old_values"] = returns, values
        ds.rows |= {"train_mask": train_mask, "old_logps": old_logps, "ref_logps": ref_logps,
                    "advantages": advantages.float()}
        return kl_tokens

    def _fill_failed(self, scores: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
        """A failed sample's score replaced by the mean of its group's valid ones (0 if none), so it adds
        nothing to its group's statistics beyond what the others say (its tokens carry no loss anyway)."""
        g = self.cfg.rl.group_size
        s, bad = scores.clone().reshape(-1, g), failed.reshape(-1, g)
        valid = (~bad).double()
        means = (s.nan_to_num(0.0) * valid).sum(1) / valid.sum(1).clamp(min=1)
        return torch.where(bad, means[:, None].expand_as(s), s).reshape(-1)

    def update(self, trainer: Trainer, ds: RolloutDataset) -> tuple[dict, dict]:
        """rl.epochs passes over the rollouts, in optimizer steps of train.global_batch_size sequences (a
        seeded shuffle per pass); the critic (PPO) steps on the same minibatches."""
        cfg, r = self.cfg, self.cfg.rl
        dp_rank, dp_size = data_parallel_rank_and_size()
        seed = cfg.train.seed * 1_000_003 + trainer.state.step
        steps = r.epochs * len(ds) // cfg.train.global_batch_size

        def iterators(n_chunks):
            return [MicroBatches(ds, cfg.train.micro_batch_size, dp_rank, dp_size, 0, seed, True, 0,
                                 collate(pad_multiple(cfg))) for _ in range(n_chunks)]

        actor_its = iterators(len(trainer.model))
        critic_its = iterators(len(self.critic.model)) if self.critic is not None and "returns" in ds.rows else None
        sums: dict[str, float] = {}
        csums: dict[str, float] = {}
        for _ in range(steps):
            for k, v in trainer.train_step(actor_its).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    sums[k] = sums.get(k, 0.0) + v / steps
            if critic_its is not None:
                for k, v in self.critic.train_step(critic_its).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        csums[f"critic/{k}"] = csums.get(f"critic/{k}", 0.0) + v / steps
        sums.pop("skipped_total", None)
        if "loss" in sums:
            sums["actor loss"] = sums.pop("loss")
        csums.pop("critic/skipped_total", None)
        if "critic/loss" in csums:
            csums["critic/value loss"] = csums.pop("critic/loss")
        return sums, csums

    # -- held-out prompts ----------------------------------------------------------------------------

    def held_out_eval(self, trainer: Trainer, prefix: str) -> dict:
        """Greedy answers to the held-out prompts: mean reward, and exact match where prompts have answers."""
        from megaflow.inference.generate import generate

        if not self.held_out:
            return {}
        if not self.ready:
            self.setup(trainer)
        prompts = self.held_out
        with trainer.params_synced():
            done = generate(self.policy, [p.ids for p in prompts], self._params(greedy=True))
        rollouts = [{"prompt": p, "prompt_ids": c.prompt_ids, "token_ids": c.token_ids, "text": c.text}
                    for p, c in zip(prompts, done)]
        scores = self.score(rollouts).values
        ok = scores[~torch.isnan(scores)]
        out = {f"{prefix}_reward": float(ok.mean()) if len(ok) else float("nan"), f"{prefix}_prompts": len(prompts)}
        answered = [(x["text"], x["prompt"].answer) for x in rollouts if x["prompt"].answer is not None]
        if answered:
            out[f"{prefix}_exact_match"] = sum(t.strip() == a.strip() for t, a in answered) / len(answered)
        shown = ", ".join(f"{k.split('_', 1)[1]} {v:.3f}" for k, v in out.items() if not k.endswith("prompts"))
        dist.print_rank0(f"held-out prompts ({prefix}): {shown} on {len(prompts)} prompts")
        return out

    def before_eval(self, trainer: Trainer) -> dict:
        """The starting policy's held-out results, measured on a fresh start and kept in before.json so a
        resumed run reports the same ones."""
        path = trainer.stage_dir / "before.json"
        if path.is_file():
            return json.loads(path.read_text())
        if trainer.state.step > 0:
            return {}
        before = self.held_out_eval(trainer, "before")
        trainer.write_json("before.json", before)
        return before


def _behaviour_logps(rollouts: list[dict], shape) -> torch.Tensor:
    """The sampler's log-probs (float64) at the label positions of each row's response tokens."""
    out = torch.zeros(shape, dtype=torch.float64)
    for i, x in enumerate(rollouts):
        start = len(x["prompt_ids"]) - 1
        out[i, start:start + len(x["logprobs"])] = torch.tensor(x["logprobs"], dtype=torch.float64)
    return out


def _offload(frozen, offload: bool):
    """With rl.offload on a GPU, a frozen model (reference, reward model) lives in host memory between uses."""
    if offload and dist.device().type == "cuda":
        for chunk in frozen.chunks:
            chunk.to("cpu")
    return frozen


@contextlib.contextmanager
def _resident(frozen, offload: bool):
    """The frozen model on the device for the block, back in host memory after it (rl.offload, GPU only)."""
    moved = offload and dist.device().type == "cuda"
    if moved:
        for chunk in frozen.chunks:
            chunk.to(dist.device())
    try:
        yield
    finally:
        if moved:
            _offload(frozen, True)
            torch.cuda.empty_cache()


def _first_of_each_kind(examples: list[str]) -> list[str]:
    """"sample i: KIND: message" examples, the first of each kind."""
    seen, out = set(), []
    for e in examples:
        kind = e.split(": ")[1] if e.count(": ") >= 2 else e
        if kind not in seen:
            seen.add(kind)
            out.append(e)
    return out


def _tied(scores: torch.Tensor) -> bool:
    valid = scores[~torch.isnan(scores)]
    return len(valid) < 2 or bool((valid == valid[0]).all())


def _explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[R - V] / Var[R] over the trained tokens: 1 is a perfect critic, <= 0 no better than a constant."""
    m = mask.bool()
    if m.sum() < 2:
        return float("nan")
    r, v = returns[m], values[m]
    var = r.var()
    return float(1.0 - (r - v).var() / var) if var > 0 else float("nan")
