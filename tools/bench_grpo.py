"""GRPO iterations/s: `megaflow train grpo` vs TRL's GRPOTrainer on the same converted model, prompts, group
size, response length and reward, side by side.

Setup (tools/bench_sft.py's): a byte-level BPE on the sample corpus with megaflow's chat template, a
`--shape` model randomly initialised by megaflow and converted with `megaflow convert megaflow-to-hf
--verify`. One iteration on both sides: --prompts prompts of data/sample/sft-words/train.jsonl (one user
turn each), --group samples each at temperature 1 and at most --new tokens, rewarded by exact match against
the record's answer (a random model scores 0: the work is the same), the reference's log-probs for a KL
loss (beta 0.01, k3), then --updates optimizer steps of (prompts x group / updates) sequences: TRL with
generation_batch_size = prompts x group and steps_per_generation = updates, loss_type "dapo" (token-mean
over the batch: megaflow's default aggregation). AdamW lr 1e-6 constant (an untrained model must not
drift into other response lengths during the run), no weight decay, clip 1.0, fp32 on CPU.

megaflow's time per iteration is its metrics.jsonl `step_time`; TRL's is the time between the ends of
consecutive generation batches (every --updates optimizer steps, from a callback). The first --warmup
iterations of each run are dropped; --rounds runs of each side, interleaved; medians.

Usage:
    python tools/bench_grpo.py                         # CPU: small shape
    python tools/bench_grpo.py --shape tiny --rounds 1 --iterations 4
Needs TRL (pip install 'megaflow[bench]'). JSON: --out (default bench-results/bench_grpo.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402
import bench_sft  # noqa: E402

REPO_ROOT = common.REPO_ROOT
PROMPTS = REPO_ROOT / "data" / "sample" / "sft-words" / "train.jsonl"
IMPLS = ("megaflow", "trl")
LR = 1e-6


def work_megaflow(spec: dict) -> dict:
    run_dir = Path(spec["dir"]) / f"mf-{spec['round']}"
    gbs = spec["prompts"] * spec["group"] // spec["updates"]
    cmd = [sys.executable, "-m", "megaflow", "train", "grpo", "--config", str(REPO_ROOT / "configs/stages/grpo-tiny.yaml"),
           f"init_from={spec['ckpt']}", f"data.train=[{{path: {PROMPTS}}}]", "data.prompts.valid=[]",
           f"run.dir={run_dir}", f"train.steps={spec['iterations']}", f"rl.prompts_per_step={spec['prompts']}",
           f"rl.group_size={spec['group']}", f"rl.max_new_tokens={spec['new']}", f"train.global_batch_size={gbs}",
           f"train.micro_batch_size={gbs}", f"train.lr={LR}", "train.weight_decay=0.0", "rl.kl_loss_coef=0.01",
           "rl.reward.function=exact_match", "rl.reward.workers=0", "checkpoint.every=0", "eval.final=false",
           "run.progress=false", "run.tensorboard=false", f"data.seq_length={spec['seq']}"]
    rc, _, err = bench_sft.call(cmd, 1800.0, Path(spec["log_dir"]) / f"megaflow-run-{spec['round']}.log")
    if rc != 0:
        raise SystemExit(f"megaflow grpo failed: {err.strip().splitlines()[-1:]}")
    rows = [json.loads(line) for line in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward/mean" in r]
    return {"times": [r["step_time"] for r in rows][spec["warmup"]:],
            "gen_tokens": [r["response/length"] * spec["prompts"] * spec["group"] for r in rows][spec["warmup"]:]}


def work_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(1)
    tok = AutoTokenizer.from_pretrained(spec["hf"])
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=torch.float32)
    records = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["response"]}
                              for r in records])

    def exact_match(prompts, completions, answer, **kwargs):
        return [float(c[0]["content"].strip() == a.strip()) for c, a in zip(completions, answer)]

    n = spec["prompts"] * spec["group"]
    args = GRPOConfig(output_dir=str(Path(spec["dir"]) / f"trl-{spec['round']}"), per_device_train_batch_size=n // spec["updates"],
                      steps_per_generation=spec["updates"], num_generations=spec["group"],
                      max_completion_length=spec["new"], temperature=1.0, top_p=1.0, top_k=0, beta=0.01,
                      loss_type="dapo", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0,
                      adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, max_steps=spec["iterations"] * spec["updates"],
                      logging_steps=1, report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available(),
                      bf16=spec["precision"] == "bf16", dataloader_num_workers=0, seed=1234, disable_dropout=True)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step % spec["updates"] == 0:
                ends.append(time.perf_counter())

    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start] + ends[:-1], ends)]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"times": times[spec["warmup"]:], "gen_tokens": [x * n for x in lengths[::spec["updates"]]][spec["warmup"]:]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Usage:")[1])
    p.add_argument("--shape", choices=sorted(common.SHAPES), help="default: small on CPU, 1b on GPU")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new", type=int, default=16)
    p.add_argument("--updates", type=int, default=2, help="optimizer steps per iteration")
    p.add_argument("--iterations", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        common.emit_result(work_trl(spec))
        return 0
    import torch

    gpu = torch.cuda.is_available()
    a.shape = a.shape or ("1b" if gpu else "small")
    precision = "bf16" if gpu else "fp32"
    out_path, log_dir = common.result_paths(a.out, "bench_grpo")
    results = {impl: {"times": [], "gen_tokens": []} for impl in IMPLS}
    with tempfile.TemporaryDirectory(prefix="bench_grpo-") as tmp:
        info = bench_sft.setup(argparse.Namespace(shape=a.shape, seq=128, unpacked_seq=128, precision=precision,
                                                  worker_timeout=900.0), Path(tmp), log_dir)
        for rnd in range(a.rounds):
            spec = {"ckpt": info["ckpt"], "hf": info["hf"], "dir": tmp, "round": rnd, "prompts": a.prompts,
                    "group": a.group, "new": a.new, "updates": a.updates, "iterations": a.iterations + a.warmup,
                    "warmup": a.warmup, "precision": precision, "seq": 64, "log_dir": str(log_dir)}
            got = {"megaflow": work_megaflow(spec)}
            rc, stdout, _ = bench_sft.call([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                           1800.0, log_dir / f"trl-{rnd}.log")
            got["trl"] = common.parse_result(stdout) if rc == 0 else None
            if got["trl"] is None:
                raise SystemExit(f"TRL failed; log {log_dir / f'trl-{rnd}.log'}")
            for impl in IMPLS:
                for k in ("times", "gen_tokens"):
                    results[impl][k] += got[impl][k]
    speed = {impl: 1.0 / common.median(results[impl]["times"]) for impl in IMPLS}
    length = {impl: common.median(results[impl]["gen_tokens"]) / (a.prompts * a.group) for impl in IMPLS}
    ratio = speed["megaflow"] / speed["trl"]
    print(common.format_table(["impl", "iterations/s (median)", "s/iteration", "mean response tokens", "iterations"],
                              [[impl, f"{speed[impl]:.3f}", f"{1 / speed[impl]:.2f}", f"{length[impl]:.1f}",
                                str(len(results[impl]["times"]))] for impl in IMPLS]))
    print(f"megaflow / TRL GRPOTrainer: {ratio:.2f}x  (shape {a.shape}, {precision}, {a.prompts} prompts x {a.group}, "
          f"<= {a.new} new tokens, {a.updates} updates per iteration)")
    record = {"benchmark": "bench_grpo", "date": common.now_iso(), "shape": a.shape, "precision": precision,
              "prompts": a.prompts, "group": a.group, "new_tokens": a.new, "updates": a.updates,
              "iterations_per_s": speed, "mean_response_tokens": length, "samples": results, "ratio_megaflow_trl": ratio,
              "env": common.env_info(), "convert": info["convert"]}
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
