"""The pipeline's `eval` stage: every stage's model on the same held-out sets, so the report can say
what each stage bought.

For each model (a label and a checkpoint): perplexity on held-out text; exact match of greedy answers to
held-out prompts; the reward model's mean score of those answers and their win rate against the
reference model's answers (megaflow.eval.compare.win_rate, with a Wilson interval); the KL to the
reference on responses sampled at temperature 1 (megaflow.eval.compare.kl_k1). With preference pairs,
the reward model's own held-out accuracy. With `safety`, the harmful-response rate on adversarial prompts
and the refusal rates on adversarial and benign ones (megaflow.eval.safety).
"""

from __future__ import annotations

import gc
from pathlib import Path

from megaflow.algorithms.base import Stage, check_wandb
from megaflow.config.schema import EvalStageConfig
from megaflow.errors import UserError
from megaflow.runtime import distributed as dist


class EvalStage(Stage):
    name = "eval"
    schema = EvalStageConfig
    summary = "every stage's model on the same held-out sets: perplexity, exact match, reward, win rate, KL"

    def inputs(self, cfg: EvalStageConfig) -> dict[str, str]:
        out = {f"models.{label}": ckpt for label, ckpt in cfg.models.items()}
        for key in ("text", "prompts", "preferences", "reward_model", "safety_rm"):
            if getattr(cfg, key):
                out[key] = getattr(cfg, key)
        if cfg.safety and cfg.safety != "bundled":
            out["safety"] = cfg.safety
        return out

    def check(self, cfg: EvalStageConfig) -> None:
        check_wandb(cfg.run)
        if cfg.reference is not None and cfg.reference not in cfg.models:
            raise UserError(f"reference: {cfg.reference!r} is not one of models ({', '.join(cfg.models)})")
        if cfg.reference and not cfg.prompts:
            raise UserError("reference: win rate and KL answer the held-out prompts; set prompts")
        if cfg.preferences and not cfg.reward_model:
            raise UserError("preferences: held-out pairs are scored by the reward model; set reward_model")

    def output(self, cfg) -> Path:
        return self.stage_dir(cfg) / "eval.json"

    def run(self, cfg: EvalStageConfig) -> dict:
        import json

        results = {label: {} for label in cfg.models}
        answers: dict[str, tuple[list, list[str]]] = {}
        sampled: dict[str, list] = {}
        for label, ckpt in cfg.models.items():
            if cfg.text:
                results[label] |= _perplexity(ckpt, cfg)
            if cfg.prompts:
                r, answers[label], sampled[label] = _answers(ckpt, cfg)
                results[label] |= r
            if cfg.safety:
                results[label] |= _safety(ckpt, cfg)
            dist.print_rank0(f"eval: {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[label].items()))
        if cfg.reference:
            for label, kl in _kl_to(cfg.models[cfg.reference], sampled, cfg.reference).items():
                results[label]["kl_to_" + cfg.reference] = kl
        out = {"status": "done", "models": results, "reference": cfg.reference}
        if cfg.reward_model:
            rm = _judge(cfg, answers)
            for label, r in rm.pop("models").items():
                results[label] |= r
            out["reward_model"] = rm
        out["samples"] = {label: [{"prompt": m[-1]["content"], "answer": a} for m, a in zip(*answers[label])][:3]
                          for label in answers}
        stage_dir = self.stage_dir(cfg)
        stage_dir.mkdir(parents=True, exist_ok=True)
        tmp = stage_dir / "eval.json.tmp"
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(stage_dir / "eval.json")
        _log_wandb(cfg, results, stage_dir)
        return out


def _log_wandb(cfg: EvalStageConfig, results: dict[str, dict], stage_dir: Path) -> None:
    """With run.wandb: one W&B run `eval` in the pipeline's group, every model's metrics as MODEL/METRIC."""
    from megaflow.training.metrics import open_wandb

    run = open_wandb(cfg.run.wandb, cfg.run.name, cfg.stage, stage_dir, cfg.model_dump(mode="json"))
    if run is None:
        return
    flat = {f"{label}/{k}": v for label, r in results.items() for k, v in r.items() if isinstance(v, (int, float))}
    run.log(flat, step=0)
    run.summary.update(flat)
    run.finish()


def _perplexity(ckpt: str, cfg: EvalStageConfig) -> dict:
    from megaflow.eval.perplexity import evaluate_checkpoint

    split_of = cfg.text if (Path(cfg.text) / "megaflow.json").is_file() else None  # its validation split
    r = evaluate_checkpoint(ckpt, None if split_of else cfg.text, seq_length=cfg.seq_length,
                            batch_size=cfg.batch_size, max_batches=cfg.max_batches, quiet=True, split_of=split_of)
    return {"ppl": r["ppl"], "loss": r["loss"]}


def _safety(ckpt: str, cfg: EvalStageConfig) -> dict:
    """The harmful-response rate on adversarial prompts and the refusal rates (megaflow.eval.safety)."""
    from megaflow.eval.safety import evaluate_safety_checkpoint

    r = evaluate_safety_checkpoint(ckpt, None if cfg.safety == "bundled" else cfg.safety, cfg.safety_rm,
                                   cfg.safety_threshold, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    gc.collect()
    return {k: r[k] for k in ("harmful_rate", "refusal_rate", "benign_refusal_rate")}


def _answers(ckpt: str, cfg: EvalStageConfig):
    """Greedy answers to the held-out prompts (exact match), and responses sampled at temperature 1 with
    their log-probs under this model (KL)."""
    from megaflow.data.sft import SFTDataOptions
    from megaflow.eval.exact_match import examples_from_file, score_answers
    from megaflow.inference import SamplingParams, generate, load_for_inference
    from megaflow.models.weights import stored_config

    model = load_for_inference(ckpt)
    if model.meta.get("head", "lm") != "lm":
        raise UserError(f"models: {ckpt} is a reward model; name it as reward_model")
    opts = SFTDataOptions.from_config(stored_config(ckpt).data.sft)
    template, examples = examples_from_file(cfg.prompts, model.tokenizer, opts)
    examples = examples[:cfg.limit]
    prompts = [template.prompt_ids(messages) for messages, _ in examples]
    greedy, sample = (SamplingParams(max_new_tokens=cfg.max_new_tokens, greedy=True),
                      SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed))
    predictions, samples = [], []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        predictions += [c.text for c in generate(model, batch, greedy)]
        samples += generate(model, batch, sample)
    em = score_answers(predictions, [answer for _, answer in examples])
    del model
    gc.collect()
    return {"exact_match": em}, ([m for m, _ in examples], predictions), samples


def _kl_to(reference: str, sampled: dict[str, list], reference_label: str) -> dict[str, float]:
    from megaflow.eval.compare import kl_k1
    from megaflow.inference import load_for_inference
    from megaflow.inference.scoring import score

    ref = load_for_inference(reference)
    out = {}
    for label, completions in sampled.items():
        if label == reference_label:
            out[label] = 0.0
            continue
        kept = [c for c in completions if c.token_ids]
        if not kept:
            continue
        scores = score(ref, [c.prompt_ids for c in kept], [c.token_ids for c in kept])
        out[label] = kl_k1([c.logprobs for c in kept], [s.logprobs for s in scores])
    del ref
    gc.collect()
    return out


def _judge(cfg: EvalStageConfig, answers: dict[str, tuple[list, list[str]]]) -> dict:
    """The reward model's mean reward of each model's answers, their win rate against the reference's,
    and (with preference pairs) the reward model's own held-out accuracy."""
    from megaflow.data.preference import encode_response
    from megaflow.eval.compare import win_rate
    from megaflow.eval.reward import evaluate_reward_accuracy, reward_template
    from megaflow.inference import load_for_inference
    from megaflow.inference.reward import rewards

    out: dict = {"models": {}}
    if cfg.preferences:
        out |= evaluate_reward_accuracy(cfg.reward_model, cfg.preferences, batch_size=cfg.batch_size, limit=cfg.limit)
    rm = load_for_inference(cfg.reward_model)
    template = reward_template(cfg.reward_model, rm)
    scored = {label: rewards(rm, [encode_response(template, m, a)[0] for m, a in zip(messages, predictions)],
                             cfg.batch_size)
              for label, (messages, predictions) in answers.items()}
    for label, r in scored.items():
        out["models"][label] = {"reward": sum(r) / len(r)}
        if cfg.reference in scored and label != cfg.reference:
            w = win_rate(r, scored[cfg.reference])
            out["models"][label] |= {f"win_rate_vs_{cfg.reference}": w["win_rate"],
                                     f"win_rate_vs_{cfg.reference}_low": w["win_rate_low"],
                                     f"win_rate_vs_{cfg.reference}_high": w["win_rate_high"]}
    del rm
    gc.collect()
    return out


STAGE = EvalStage()
