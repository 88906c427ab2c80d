"""run.dir/report.md and plots/*.png: what each stage did and what it bought, from pipeline.json, each
stage's eval.json and metrics.jsonl. Written after every `megaflow run`, also one that failed a gate."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from megaflow.algorithms import registry
from megaflow.pipeline.spec import Pipeline
from megaflow.pipeline.state import State

# the headline metrics of each stage's own result, in the order the report shows them
HEADLINE = {
    "curate": ("documents_in", "documents_out", "exact_duplicates", "near_duplicates"),
    "tokenizer": ("vocab_size",),
    "preprocess": ("documents", "tokens"),
    "pretrain": ("valid_ppl", "unigram_ppl", "valid_loss"),
    "sft": ("valid_loss", "exact_match"),
    "rm": ("valid_accuracy", "valid_margin", "valid_loss"),
    "dpo": ("before_rewards_accuracies", "valid_rewards_accuracies", "before_rewards_margins",
            "valid_rewards_margins", "valid_kl_chosen"),
    "ppo": ("before_exact_match", "valid_exact_match", "before_reward", "valid_reward"),
    "grpo": ("before_exact_match", "valid_exact_match", "before_reward", "valid_reward"),
}
EVAL_COLUMNS = ("ppl", "exact_match", "reward", "win_rate_vs_{ref}", "kl_to_{ref}", "harmful_rate", "benign_refusal_rate")


def _metrics_lines(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line cut short by a kill
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _compute(p, rec: dict, lines: list[dict], price: float | None) -> dict:
    """Tokens, throughput and training FLOPs (Megatron's formula, as `megaflow plan` and the engine's MFU)."""
    from megaflow.models.size import flops_per_step, padded_vocab_size

    train = [ln for ln in lines if "split" not in ln and "loss" in ln]
    out = {"minutes": rec.get("seconds", 0.0) / 60}
    if not train or p.name not in registry.TRAINING:
        return out
    speeds = [ln["tok_per_s"] for ln in train if isinstance(ln.get("tok_per_s"), (int, float))]
    if speeds:
        out["tok/s"] = statistics.median(speeds)
    cfg = p.cfg
    if "tokens_seen" in train[-1]:
        out["tokens"] = train[-1]["tokens_seen"]
    vocab = padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tp)
    per_step = flops_per_step(cfg.model, vocab, cfg.train.global_batch_size, cfg.data.seq_length)
    out["PFLOP"] = per_step * train[-1]["step"] / 1e15
    hours = rec.get("seconds", 0.0) * p.nproc / 3600
    out["device-hours"] = hours
    if price is not None:
        out["cost"] = hours * price
    return out


def _plots(pipeline: Pipeline, run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    curves = {}
    for name, p in pipeline.stages.items():
        if name in registry.TRAINING:
            lines = _metrics_lines(p.stage.stage_dir(p.cfg))
            train = [(ln["step"], ln["loss"]) for ln in lines if "split" not in ln and "loss" in ln]
            valid = [(ln["step"], ln["loss"]) for ln in lines if ln.get("split") == "valid" and "loss" in ln]
            extra = {k: [(ln["step"], ln[k]) for ln in lines if "split" not in ln and k in ln]
                     for k in ("accuracy", "rewards/accuracies", "rewards/margins", "kl/chosen", "reward/mean", "kl/ref")}
            if train:
                curves[name] = (train, valid, {k: v for k, v in extra.items() if v})
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
        for ax, (name, (train, valid, extra)) in zip(axes[0], curves.items()):
            ax.plot(*zip(*train), label="train loss", lw=1)
            if valid:
                ax.plot(*zip(*valid), "o-", label="valid loss")
            twin = ax.twinx() if extra else None
            for k, pts in extra.items():
                twin.plot(*zip(*pts), lw=1, ls="--", label=k)
            if twin is not None:
                twin.legend(loc="center right", fontsize=7)
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.legend(loc="upper right", fontsize=7)
        fig.tight_layout()
        fig.savefig(plots / "training.png", dpi=90)
        plt.close(fig)
        made.append("plots/training.png")
    table = _eval_table(pipeline)
    if table:
        columns, rows = table
        numeric = [c for c in columns if all(isinstance(r.get(c), (int, float)) for r in rows.values())]
        if numeric:
            fig, axes = plt.subplots(1, len(numeric), figsize=(3 * len(numeric), 3), squeeze=False)
            for ax, c in zip(axes[0], numeric):
                ax.bar(list(rows), [rows[m][c] for m in rows], color="tab:blue")
                ax.set_title(c, fontsize=9)
                ax.tick_params(axis="x", labelsize=8)
            fig.tight_layout()
            fig.savefig(plots / "eval.png", dpi=90)
            plt.close(fig)
            made.append("plots/eval.png")
    return made


def _eval_table(pipeline: Pipeline):
    p = pipeline.stages.get("eval")
    result = p.stage.result(p.cfg) if p is not None else None
    if not result or "models" not in result:
        return None
    ref = result.get("reference") or ""
    columns = [c.format(ref=ref) for c in EVAL_COLUMNS if ref or "{ref}" not in c]
    rows = result["models"]
    columns = [c for c in columns if any(c in r for r in rows.values())]
    return columns, rows


def write_report(pipeline: Pipeline, state: State) -> Path:
    run_dir = pipeline.run_dir
    lines = [f"# Pipeline report: {pipeline.run.name}", "",
             f"`{pipeline.path}` → `{run_dir}` · megaflow {state.data.get('megaflow', '?')} · "
             f"updated {state.data.get('updated', '?')}", ""]
    lines += ["## Stages", "", "| stage | status | minutes | steps | tokens | tok/s | PFLOP | device-hours"
              + (" | cost" if pipeline.price_per_hour is not None else "") + " | output |",
              "|---|---|---|---|---|---|---|---|" + ("---|" if pipeline.price_per_hour is not None else "") + "---|"]
    gates = []
    for name, p in pipeline.stages.items():
        rec = state.stage(name) or {}
        stage_lines = _metrics_lines(p.stage.stage_dir(p.cfg)) if name in registry.TRAINING else []
        c = _compute(p, rec, stage_lines, pipeline.price_per_hour)
        steps = (rec.get("metrics") or {}).get("step")
        output = p.stage.output(p.cfg)
        try:
            link = output.relative_to(run_dir)
        except ValueError:
            link = output
        cells = [name, rec.get("status", "not run"), _fmt(c.get("minutes")), _fmt(int(steps) if steps else None),
                 _fmt(c.get("tokens")), _fmt(c.get("tok/s")), _fmt(c.get("PFLOP")), _fmt(c.get("device-hours"))]
        if pipeline.price_per_hour is not None:
            cells.append(_fmt(c.get("cost")))
        cells.append(f"[{link}]({link})" if output.exists() else "")
        lines.append("| " + " | ".join(cells) + " |")
        gates += [(name, g) for g in rec.get("gates", [])]
    lines += [""]
    lines += ["## Each stage's own evaluation", ""]
    for name, p in pipeline.stages.items():
        metrics = (state.stage(name) or {}).get("metrics") or {}
        shown = [(k, metrics[k]) for k in HEADLINE.get(name, ()) if k in metrics]
        if shown:
            lines.append(f"- **{name}**: " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown))
    table = _eval_table(pipeline)
    if table:
        columns, rows = table
        lines += ["", "## What each stage bought (the same held-out sets, every model)", "",
                  "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for model, r in rows.items():
            cells = []
            for col in columns:
                v = r.get(col)
                if col.startswith("win_rate") and v is not None:
                    cells.append(f"{v:.3f} [{r.get(col + '_low', 0):.3f}, {r.get(col + '_high', 0):.3f}]")
                else:
                    cells.append(_fmt(v))
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += ["", "ppl: perplexity of held-out text; exact_match: greedy answers to held-out prompts; reward: the "
                  "reward model's mean score of those answers; win_rate: answers the reward model prefers to the "
                  "reference's (ties half; 95% Wilson interval); kl: KL to the reference per response, sampled at "
                  "temperature 1."]
    if gates:
        lines += ["", "## Gates", ""]
        lines += [f"- {'passed' if g['passed'] else '**failed**'}: {name}: {g['detail']}" for name, g in gates]
    try:
        made = _plots(pipeline, run_dir)
    except Exception as e:  # noqa: BLE001 - a plot must never hide the report
        made = []
        lines += ["", f"(plots not drawn: {type(e).__name__}: {e})"]
    if made:
        lines += ["", "## Plots", ""] + [f"![{m}]({m})" for m in made]
    path = run_dir / "report.md"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path
