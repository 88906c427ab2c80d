"""DPO steps/s: megaflow's DPO stage vs TRL's DPOTrainer on the same model, pairs and batches, side by side.

Setup, once per run in a temporary folder, is tools/bench_sft.py's (its `setup`, reused): a byte-level BPE
(4096 tokens) trained on the sample corpus with megaflow's built-in chat template plus `{% generation %}`
marks; a `--shape` model randomly initialised by megaflow, saved as a final checkpoint and converted with
`megaflow convert megaflow-to-hf --verify`, so TRL starts from equal weights and the same tokenizer files.
Data: the first (--warmup + --steps) x --batch pairs of data/sample/pref-words/train.jsonl (prompt / chosen
/ rejected strings; TRL gets them as conversational records), read in file order by both, so every step
holds the same pairs on both sides.

Equal work per step: sigmoid DPO (beta 0.1; --loss-type ipo also), --batch pairs per optimizer step in one
micro-batch (one [2 x batch, L] forward and backward of chosen and rejected rows), the reference's
log-probs precomputed before training on both sides (megaflow's default `dpo.reference=cached`, TRL's
`precompute_ref_log_probs=True`; the reference pass is timed separately, not in steps/s), AdamW lr 3e-4
constant, betas (0.9, 0.95), eps 1e-8, weight decay 0.1, clip 1.0, no recomputation; fp32 on CPU, bf16 on
GPU. Rows: megaflow cuts each micro-batch after its longest sequence rounded up to a multiple of 16
(`data.padding: longest`, its default; "full rows" keeps every row at --seq, `data.padding: max_length`),
TRL pads to the batch's longest (its max_length is --seq); the default --seq is the longest pair of the
data (31 tokens) rounded up to 32, where the two megaflow rows compute the same positions.
Tokens: a sequence of L tokens counts L, padding never (the same on both sides: each renders
prompt + response through the same template). Response tokens differ by one per sequence: TRL's completion
is everything the template adds after the generation prompt, so also the newline after <|end_of_turn|>;
megaflow's response mask ends at <|end_of_turn|> (tests/convert/test_dpo_vs_trl.py checks both token for
token and the losses on equal masks to 1e-4).
megaflow also runs packed (`data.preference.packing`: pairs in rows of 2 x --seq, each prompt stored once
for both responses with the local attention; megaflow/data/pair_packing.py): the same pairs in all, as many
rows per step as cover them in the run's steps, so its steps are fewer pairs' worth apart; compare pairs/s.
Each side runs its own loop (Trainer.train / DPOTrainer.train) for --warmup + --steps steps in a process of
its own, interleaved over --repeats rounds (medians); a step is timed from the end of the one before.

Usage:
    python tools/bench_dpo.py                                 # CPU: small shape, fp32
    python tools/bench_dpo.py --shape tiny --repeats 1 --steps 3 --warmup 1
    python3 tools/bench_dpo.py --shape 1b                     # GPU: bench-1b shape (vocab 4096), bf16
    python tools/bench_dpo.py --device gpu --dry-run          # the GPU plan, here
Needs TRL (pip install 'megaflow[bench]'). JSON: --out (default bench-results/bench_dpo.json, or
$OUT/bench_dpo.json when $OUT is a folder); worker logs next to it. On the GPU machine: the PYTHONPATH of
../shared/gpu/README.md, plus TRL; --max-minutes (default 8) stops starting new rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402  (stdlib + yaml; torch is imported lazily)
import bench_sft  # noqa: E402  (setup, megaflow overrides, worker calls, the optimizer settings)

REPO_ROOT = common.REPO_ROOT
DATA = REPO_ROOT / "data" / "sample" / "pref-words" / "train.jsonl"
IMPLS = ("megaflow", "megaflow-full-rows", "megaflow-packed", "trl")
LABELS = {"megaflow": "megaflow DPO", "megaflow-full-rows": "megaflow DPO, full rows", "megaflow-packed":
          "megaflow DPO, packed", "trl": "TRL DPOTrainer"}
DEFAULTS = {
    "cpu": dict(shape="small", seq=32, batch=16, repeats=5, steps=6, warmup=2, worker_timeout=900.0, max_minutes=None),
    "gpu": dict(shape="1b", seq=32, batch=128, repeats=3, steps=10, warmup=3, worker_timeout=400.0, max_minutes=8.0),
}
SEED, LR, VOCAB, BETA = bench_sft.SEED, bench_sft.LR, bench_sft.VOCAB, 0.1


# ---------------------------------------------------------------------------------------------- workers


def _stats(tokens, pairs, response_tokens, positions) -> dict:
    return {"tokens": int(tokens), "pairs": int(pairs), "response_tokens": int(response_tokens),
            "positions": int(positions)}


def megaflow_overrides(spec: dict) -> list[str]:
    """bench_sft's model and optimizer settings, as the dpo stage from the converted checkpoint's source."""
    ov = [x for x in bench_sft.megaflow_overrides(spec, spec["seq"], spec["batch"]) if x != "stage=sft"]
    return ov + ["stage=dpo", f"dpo.loss_type={spec['loss_type']}", f"dpo.beta={BETA}", "dpo.reference=cached",
                 "data.preference.valid=[]", "eval.final=false",
                 f"data.preference.packing={str(spec['impl'] == 'megaflow-packed').lower()}",
                 f"data.padding={'max_length' if spec['impl'] == 'megaflow-full-rows' else 'longest'}"]


def work_megaflow(spec: dict) -> dict:
    """megaflow's DPO stage as `megaflow train dpo` runs it (megaflow.algorithms.dpo.main: pairs, cached
    reference log-probs, DPOTask, Trainer.train), minus held-out evaluation and saving; pairs in file order."""
    from megaflow.algorithms.dpo import DPOTask
    from megaflow.config import load_config
    from megaflow.algorithms import reference
    from megaflow.algorithms.dpo import STAGE as DPO
    from megaflow.data.preference import collate_pairs
    from megaflow.data.sampler import MicroBatches, stack
    from megaflow.models.gpt import use_transformer_engine
    from megaflow.training import init_from, stage
    from megaflow.algorithms.base import pad_multiple
    from megaflow.training.engine import Trainer

    run_dir, batch = Path(spec["dir"]) / "run", spec["batch"]
    cfg = load_config(None, [*megaflow_overrides(spec), f"run.dir={run_dir}", f"init_from={spec['ckpt']}",
                             f"data.train=[{{path: {spec['pairs']}}}]"])
    t0 = time.perf_counter()
    init_dir = init_from.resolve_init_from(cfg.init_from)  # as the runner: runtime, the checkpoint's tokenizer
    stage.setup_runtime(cfg)
    cfg.tokenizer.path = str(init_dir / "tokenizer")
    s = DPO.prepare_pairs(cfg, stage.ensure_tokenizer(cfg)[0], init_dir)  # its template, tokenized pairs
    assert s.prepared.template.source == bench_sft.TEMPLATE and not s.prepared.added_tokens
    assert len(s.train) == spec["pairs_used"] and not s.held_out and s.prepared.summary.truncated == 0
    pad = s.prepared.tokenizer.pad_id
    t_ref = time.perf_counter()
    ref, _, computed = reference.cached_logps(cfg, s.vocab, init_dir, s.train, pad, run_dir / "cache")
    ref_s = time.perf_counter() - t_ref
    assert computed
    packed = cfg.data.preference.packing
    data = reference.pair_dataset(cfg, s.train, pad, ref)
    if packed:  # the same pairs in all: rows of 2 x seq, as many per step as cover them in the run's steps
        batch = -(-len(data) // (spec["warmup"] + spec["steps"]))
        cfg.train.micro_batch_size = cfg.train.global_batch_size = batch
    trainer = Trainer(cfg, DPOTask(spec["loss_type"], BETA, packed=packed), s.vocab, run_dir / "dpo")
    trainer.init_weights_from(init_dir)
    stats, ends, losses = [], [], []

    class Counted(MicroBatches):
        def __next__(self):
            b = super().__next__()
            if packed:  # tokens: each pair's two sequences, as unpacked (shared prompts count twice)
                members = [int(i) for i in b["pair_index"].reshape(-1) if i >= 0]
                tokens = sum(len(s.train[i].chosen_ids) + len(s.train[i].rejected_ids) for i in members)
                stats.append(_stats(tokens, len(members), b["loss_mask"].sum(), b["tokens"].numel()))
            else:
                stats.append(_stats(b["segment_ids"].sum(), b["tokens"].shape[0] // 2, b["loss_mask"].sum(),
                                    b["tokens"].numel()))
            return b

    common.clock_train_step(trainer, ends, losses)
    build_s = time.perf_counter() - t0 - ref_s
    multiple = 0 if packed else pad_multiple(cfg)  # as megaflow.algorithms.preference.batch_iterators
    collate = stack if packed else collate_pairs
    trainer.train(lambda consumed: [Counted(data, batch, 0, 1, consumed, SEED, False, multiple, collate)], None)
    trainer.close()
    return {"ends": ends, "losses": losses, "stats": stats, "build_s": build_s, "ref_s": ref_s,
            "info": {"pairs": len(s.train), "optimizer": type(getattr(trainer.optimizer, "optimizer",
                                                                         trainer.optimizer)).__name__,
                     "layer_spec": "te" if use_transformer_engine() else "local"}}


def work_trl(spec: dict) -> dict:
    """TRL's DPOTrainer on the converted HF model: conversational pairs, its own tokenization, precomputed
    reference log-probs (the policy before training), its own loop; pairs in file order."""
    import importlib.util

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seq, batch, gpu = spec["seq"], spec["batch"], torch.cuda.is_available()
    t0 = time.perf_counter()
    records = [json.loads(line) for line in Path(spec["pairs"]).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records])
    attn = "flash_attention_2" if gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], attn_implementation=attn, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["hf"])
    in_order = "train_sampling_strategy" in trl.DPOConfig.__dataclass_fields__  # transformers >= 5.x
    args = trl.DPOConfig(
        output_dir=str(Path(spec["dir"]) / "trl"), max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch_fused" if gpu else "adamw_torch", bf16=spec["precision"] == "bf16",
        gradient_checkpointing=False, use_cpu=not gpu, seed=SEED, data_seed=SEED, beta=BETA,
        loss_type=[spec["loss_type"]], precompute_ref_log_probs=True, max_length=seq, report_to="none",
        save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0,
        **({"train_sampling_strategy": "sequential"} if in_order else {}))
    ref_s = []

    class Timed(trl.DPOTrainer):
        def _precompute_ref_logps(self, *a, **kw):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **kw)
            if gpu:
                torch.cuda.synchronize()
            ref_s.append(time.perf_counter() - t)
            return out

    trainer = Timed(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    if not in_order:  # an older transformers: the same order by hand
        trainer._get_train_sampler = lambda *_, **__: torch.utils.data.SequentialSampler(trainer.train_dataset)
    stats, ends, losses = [], [], []
    common.clock_hf_trainer(trainer, ends, losses, stats, lambda b: _stats(
        b["attention_mask"].sum(), b["input_ids"].shape[0] // 2, b["completion_mask"].sum(), b["input_ids"].numel()))
    build_s = time.perf_counter() - t0 - sum(ref_s)
    trainer.train()
    return {"ends": ends, "losses": losses, "stats": stats, "build_s": build_s, "ref_s": sum(ref_s),
            "info": {"pairs": len(trainer.train_dataset), "attn_implementation": model.config._attn_implementation,
                     "optimizer": args.optim, "trl": trl.__version__,
                     "recompute": bool(getattr(model, "is_gradient_checkpointing", False))}}


def run_worker(spec: dict) -> None:
    if spec["impl"].startswith("megaflow"):
        import megatron.core  # noqa: F401  before any cuDNN op (Transformer Engine, ../shared/gpu/README.md)
    out = (work_trl if spec["impl"] == "trl" else work_megaflow)(spec)
    common.emit_result(common.finish_worker(out, spec["warmup"]))


# ---------------------------------------------------------------------------------------------- parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="megaflow DPO vs TRL DPOTrainer: steps/s and tokens/s, side by side",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Usage:")[1])
    p.add_argument("--shape", choices=sorted(common.SHAPES), help="default: small on CPU, 1b on GPU")
    p.add_argument("--seq", type=int, help="sequence budget: megaflow's row length, TRL's max_length (default 32)")
    p.add_argument("--batch", type=int, help="pairs per optimizer step (one micro-batch)")
    p.add_argument("--loss-type", choices=["sigmoid", "ipo"], default="sigmoid")
    common.add_run_flags(p)
    a = p.parse_args(argv)
    if a.worker:
        return a
    common.resolve_run_flags(a, DEFAULTS, "bench_dpo")
    if min(a.repeats, a.steps, a.warmup, a.seq, a.batch) < 1:
        p.error("--repeats, --steps, --warmup (the first step's end starts the clock) and sizes must be >= 1")
    a.pairs_used = (a.warmup + a.steps) * a.batch
    available = sum(1 for line in DATA.read_text().splitlines() if line.strip())
    if a.pairs_used > available:
        p.error(f"(--warmup + --steps) x --batch = {a.pairs_used} pairs, but {DATA.name} has {available}")
    return a


def worker(spec: dict, timeout: float, log: Path) -> dict | None:
    rc, out, _ = bench_sft.call([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                timeout, log)
    return common.parse_result(out) if rc == 0 else None


def summarize(a, results: list[dict]) -> dict:
    rows = {}
    for impl in IMPLS:
        runs = [r for r in results if r["impl"] == impl and not r.get("failed")]
        if not runs:
            rows[impl] = {"impl": impl, "failed": True}
            continue
        rate = [{k: sum(s[k] for s in r["stats"][a.warmup:]) / sum(r["times"]) for k in r["stats"][0]}
                | {"steps": len(r["times"]) / sum(r["times"])} for r in runs]
        rows[impl] = {"impl": impl, **{f"{k}_per_s": common.median([x[k] for x in rate]) for k in rate[0]},
                      "repeat_steps_per_s": [x["steps"] for x in rate], "repeats": len(runs),
                      "median_step_s": common.median([common.median(r["times"]) for r in runs]),
                      "tokens_per_step": common.median([s["tokens"] for s in runs[0]["stats"][a.warmup:]]),
                      "positions_per_step": common.median([s["positions"] for s in runs[0]["stats"][a.warmup:]]),
                      "ref_pass_s": common.median([r["ref_s"] for r in runs]),
                      "build_s": common.median([r["build_s"] for r in runs]),
                      "first_loss": runs[0]["losses"][0], "last_loss": runs[0]["losses"][-1],
                      "tokens_per_step_all": [s["tokens"] for s in runs[0]["stats"]],
                      "response_tokens_per_step": [s["response_tokens"] for s in runs[0]["stats"]],
                      "info": runs[0]["info"]}
    mf, trl, packed = rows["megaflow"], rows["trl"], rows["megaflow-packed"]
    if not packed.get("failed") and not trl.get("failed"):
        trl["packed_over_this_pairs"] = packed["pairs_per_s"] / trl["pairs_per_s"]
    if not mf.get("failed") and not trl.get("failed"):
        trl |= {"megaflow_over_this": mf["steps_per_s"] / trl["steps_per_s"],
                "first_loss_diff_vs_megaflow": abs(mf["first_loss"] - trl["first_loss"]),
                "same_tokens_per_step": mf["tokens_per_step_all"] == trl["tokens_per_step_all"],
                "extra_response_tokens_per_step": [t - m for t, m in zip(trl["response_tokens_per_step"],
                                                                          mf["response_tokens_per_step"])]}
    return rows


def print_table(rows: dict, a, convert: dict, loads: list[float]) -> None:
    table = [[LABELS[r["impl"]]] + (["failed"] + [""] * 8 if r.get("failed") else
             [f"{r['steps_per_s']:.2f}", f"{1000 * r['median_step_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
              f"{r['pairs_per_s']:,.1f}", f"{r['tokens_per_step']:,.0f} / {r['positions_per_step']:,.0f}",
              f"{r['ref_pass_s']:.2f}", f"{r['first_loss']:.5f} -> {r['last_loss']:.5f}",
              f"{r['megaflow_over_this']:.2f}" if "megaflow_over_this" in r else ""])
             for r in rows.values()]
    print("\n" + common.format_table(["implementation", "steps/s", "ms/step", "tokens/s", "pairs/s",
                                      "tokens / positions per step", "ref pass s", "loss step 1 -> last",
                                      "megaflow/this"], table))
    t = rows["trl"]
    if "packed_over_this_pairs" in t:
        print(f"* megaflow packed / TRL in pairs/s: {t['packed_over_this_pairs']:.2f} (packed rows of 2 x --seq, "
              "prompts shared with the local attention; the same pairs in all, in fewer, fuller steps)")
    if "same_tokens_per_step" in t:
        same = "the same on both sides" if t["same_tokens_per_step"] else f"DIFFER: TRL {t['tokens_per_step_all']}"
        print(f"* tokens per step {same}; step-1 loss |diff| {t['first_loss_diff_vs_megaflow']:.2e} "
              f"(policy = reference: {'log 2' if a.loss_type == 'sigmoid' else '(1/(2 beta))^2'} on both)")
        print(f"* response tokens per step, TRL - megaflow: {sorted(set(t['extra_response_tokens_per_step']))} "
              f"(= 2 x {a.batch} pairs: TRL's completion also holds the template's newline after <|end_of_turn|>)")
    print(f"* weights: megaflow's random init -> megaflow-to-hf --verify: max |logit diff| "
          f"{convert.get('max_abs_logit_diff')}")
    print("* steps/s and tokens/s: whole optimizer steps after the warm-up (medians over rounds); tokens: the pairs' "
          "tokens, no padding; positions: rows x row length (megaflow: the longest rounded up to 16, or --seq with full "
          "rows; TRL: the batch's longest); "
          "ref pass: the reference log-probs of all pairs before training (not in steps/s); megaflow/this: ratio "
          "of steps/s")
    if loads:
        print(f"* 1-min load average after each worker: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        run_worker(json.loads(a.worker))
        return 0
    m = common.read_shape(a.shape)
    print(f"bench_dpo: device={a.device} shape={a.shape} (h{m['hidden_size']} L{m['num_layers']} "
          f"ffn{m['ffn_hidden_size']}, vocab {VOCAB}) {a.precision}; {a.loss_type} DPO beta {BETA}, reference "
          f"log-probs precomputed; "
          f"{a.repeats} rounds x {a.steps} steps (+{a.warmup} warm-up) of {a.batch} pairs, seq {a.seq}; "
          f"the first {a.pairs_used} pairs of {DATA.relative_to(REPO_ROOT)} in file order", flush=True)
    spec0 = {"impl": "", "shape": a.shape, "seq": a.seq, "batch": a.batch, "precision": a.precision,
             "warmup": a.warmup, "steps": a.steps, "loss_type": a.loss_type, "pairs_used": a.pairs_used}
    if a.dry_run:
        print("  megaflow overrides: " + " ".join(megaflow_overrides(spec0)))
        print("dry run: nothing executed")
        return 0
    out = Path(a.out) if Path(a.out).is_absolute() else REPO_ROOT / a.out
    log_dir = out.parent / (out.stem + "-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp, started, results, round_s = Path(tempfile.mkdtemp(prefix="bench-dpo-")), time.time(), [], 0.0
    try:
        setup_args = SimpleNamespace(shape=a.shape, seq=a.seq, unpacked_seq=a.seq, precision=a.precision,
                                     worker_timeout=a.worker_timeout)
        setup_info = bench_sft.setup(setup_args, tmp, log_dir)
        pairs = tmp / "pairs.jsonl"
        pairs.write_text("".join([line for line in DATA.read_text().splitlines(keepends=True) if line.strip()]
                                 [:a.pairs_used]))
        print(f"  setup (tokenizer, init, megaflow-to-hf --verify) done in {time.time() - started:.0f} s", flush=True)
        record = {"benchmark": "bench_dpo", "date": common.now_iso(), "setup": {"convert": setup_info["convert"]},
                  "args": {k: v for k, v in vars(a).items() if k != "worker"}}
        for rep in range(a.repeats):
            if rep and a.max_minutes and time.time() - started + round_s > 60 * a.max_minutes:
                print(f"stopping after {rep} rounds: --max-minutes {a.max_minutes} would be exceeded", flush=True)
                break
            t_round = time.time()
            print(f"round {rep + 1}/{a.repeats}", flush=True)
            for impl in IMPLS:
                d = tmp / f"{impl}-{rep}"
                spec = spec0 | {"impl": impl, "dir": str(d), "ckpt": setup_info["ckpt"], "hf": setup_info["hf"],
                                "pairs": str(pairs)}
                r = worker(spec, a.worker_timeout, log_dir / f"{impl}-r{rep}.log")
                shutil.rmtree(d, ignore_errors=True)
                results.append((r or {"failed": True}) | {"impl": impl, "repeat": rep})
                if r:
                    print(f"  {LABELS[impl]:<23} {len(r['times']) / sum(r['times']):6.2f} steps/s, "
                          f"{1000 * common.median(r['times']):7.1f} ms/step, ref pass {r['ref_s']:.2f} s "
                          f"(loss {r['losses'][0]:.5f} -> {r['losses'][-1]:.5f})", flush=True)
            round_s = time.time() - t_round
            record |= {"env": next((r["env"] for r in results if not r.get("failed")), {}), "results": results,
                       "summary": summarize(a, results), "elapsed_s": time.time() - started}
            out.write_text(json.dumps(record, indent=1) + "\n")  # after every round, so a cut-off run keeps its data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if all(r.get("failed") for r in results):
        print(f"every worker failed; see {log_dir}")
        return 1
    loads = [r["loadavg_1min"] for r in results if not r.get("failed")]
    print_table(record["summary"], a, setup_info["convert"], loads)
    print(f"\nJSON -> {out} (logs in {log_dir}); {time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
