"""SFT tokens/s: megaflow's SFT stage vs TRL's SFTTrainer on the same model, data and batches, side by side.

Setup, once per run in a temporary folder: a byte-level BPE (4096 tokens) trained on the sample corpus with
megaflow's built-in chat template plus `{% generation %}` marks around the assistant's text and end-of-turn
token (TRL's assistant_only_loss needs them; megaflow's masks with them are its built-in template's, checked);
a `--shape` model randomly initialised by megaflow, saved as a final checkpoint and converted with
`megaflow convert megaflow-to-hf --verify`, so TRL starts from equal weights and the same tokenizer files.
Data: data/sample/sft-words/train.jsonl as user/assistant turns, loss on the assistant tokens only.

  packed    megaflow: data.sft.packing (best-fit decreasing into rows of --seq, block-diagonal mask on CPU, THD
            with TE on GPU), shuffled rows. TRL: packing=True, packing_strategy="bfd", i.e. padding-free: a
            micro-batch is one flattened sequence with per-sample position_ids (transformers masks it
            block-diagonally for SDPA; flash-attention varlen on GPU when flash_attn is installed); without
            flash_attn also as --trl-accum accumulated micro-batches per step (same update, less attention).
  unpacked  one sample per row, in rows of --unpacked-seq cut after the micro-batch's longest rounded up to 16
            (megaflow's data.padding: longest) or padded to the batch's longest (TRL); both read
            the samples in file order, so the batches, step-1 losses and loss tokens per step are equal.
Each side runs its own loop (Trainer.train / SFTTrainer.train) for --warmup + --steps optimizer steps in a
process of its own, interleaved over --repeats rounds (medians); a step is timed from the end of the one
before. Tokens: a sample of L tokens counts L, padding never. Both: AdamW lr 3e-4 constant, betas
(0.9, 0.95), eps 1e-8, weight decay 0.1, clip 1.0, no recomputation; fp32 on CPU, bf16 on GPU.

Usage:
    python tools/bench_sft.py                                 # CPU: small shape, fp32
    python tools/bench_sft.py --shape tiny --repeats 1 --steps 2 --warmup 1
    python3 tools/bench_sft.py --shape 1b                     # GPU: bench-1b shape (vocab 4096), bf16
    python tools/bench_sft.py --device gpu --dry-run          # the GPU plan, here
Needs TRL (pip install 'megaflow[bench]'). JSON: --out (default bench-results/bench_sft.json, or
$OUT/bench_sft.json when $OUT is a folder); worker logs next to it. On the GPU machine: the PYTHONPATH of
../shared/gpu/README.md, plus TRL; --max-minutes (default 8) stops starting new rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402  (stdlib + yaml; torch is imported lazily)
from bench_pretrain import worker_env  # noqa: E402

REPO_ROOT = common.REPO_ROOT
DATA = REPO_ROOT / "data" / "sample" / "sft-words" / "train.jsonl"
CORPUS = REPO_ROOT / "data" / "sample" / "tinyshakespeare.txt"
MODES, IMPLS = ("packed", "unpacked"), ("megaflow", "trl")
DEFAULTS = {  # unpacked_batch None: batch * seq / unpacked_seq; trl_accum None on GPU: 1 with flash_attn, else 8
    "cpu": dict(shape="small", seq=128, batch=16, unpacked_seq=32, unpacked_batch=None, trl_accum=4, repeats=5,
                steps=6, warmup=2, worker_timeout=900.0, max_minutes=None),
    "gpu": dict(shape="1b", seq=2048, batch=8, unpacked_seq=32, unpacked_batch=500, trl_accum=None, repeats=2,
                steps=10, warmup=3, worker_timeout=400.0, max_minutes=8.0),
}
SEED, LR, VOCAB = 1234, 3e-4, 4096
# megaflow's CHAT_TEMPLATE with generation marks around the assistant's text and its end-of-turn token
TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ '\\n' }}{% if message['role'] == 'assistant' %}"
            "{% generation %}{{ message['content'] }}<|end_of_turn|>{% endgeneration %}{% else %}"
            "{{ message['content'] }}<|end_of_turn|>{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}")


# ---------------------------------------------------------------------------------------------- workers


def megaflow_overrides(spec: dict, seq: int, batch: int) -> list[str]:
    preset, model_over = common.SHAPES[spec["shape"]]
    ov = [f"model.preset={preset}", f"model.vocab_size={VOCAB}"] + [f"model.{k}={v}" for k, v in model_over.items()]
    if seq > common.read_shape(spec["shape"])["max_position_embeddings"]:
        ov.append(f"model.max_position_embeddings={seq}")
    return ov + [
        "stage=sft", f"data.seq_length={seq}", f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}",
        f"train.lr={LR}", "train.min_lr=0.0", "train.schedule=constant", "train.warmup_steps=0",
        f"train.steps={spec['warmup'] + spec['steps']}", f"train.seed={SEED}", "train.clip_grad=1.0",
        "train.weight_decay=0.1", "train.adam_beta1=0.9", "train.adam_beta2=0.95", "train.adam_eps=1e-8",
        "checkpoint.every=0", "eval.every=0", "run.tensorboard=false", "run.progress=false", "run.log_every=1",
        f"precision={spec['precision']}", "parallel.recompute=none",
    ]


def _megaflow_setup(spec: dict, seq: int, batch: int, run_dir: Path):
    from megaflow.config import load_config
    from megaflow.runtime import distributed as dist

    cfg = load_config(None, [*megaflow_overrides(spec, seq, batch), f"run.dir={run_dir}"])
    dist.setup(tp=1, pp=1, seed=cfg.train.seed)
    return cfg


def work_init(spec: dict) -> dict:
    """The tokenizer (with the marked template) and megaflow's randomly initialised model, as a final checkpoint."""
    from megaflow.data.tokenizer import train_tokenizer
    from megaflow.models import weights
    from megaflow.training import stage
    from megaflow.training.engine import build_model

    out = Path(spec["dir"])
    tok = train_tokenizer([str(CORPUS)], VOCAB, str(out / "tokenizer")).with_special_tokens({}, TEMPLATE)
    cfg = _megaflow_setup(spec, spec["seq"], 1, out / "run")
    assert tok.vocab_size == VOCAB == cfg.model.vocab_size, tok.vocab_size
    model, _ = build_model(cfg, VOCAB)
    weights.save_final(out / "megaflow", model, stage.final_meta(cfg, VOCAB, 0, 0, []), tok)
    return {"ckpt": str(out / "megaflow")}


def _batch_stats(tokens: int, samples: int, loss_tokens: int, positions: int) -> dict:
    return {"tokens": int(tokens), "samples": int(samples), "loss_tokens": int(loss_tokens), "positions": int(positions)}


def work_megaflow(spec: dict) -> dict:
    """megaflow's SFT stage as `megaflow train sft` runs it (data, SFTTask, Trainer.train), minus eval and saving."""
    from megaflow.algorithms.sft import SFTTask
    from megaflow.data.sampler import MicroBatches
    from megaflow.data import sft
    from megaflow.data.chat import ChatTemplate
    from megaflow.data.tokenizer import CHAT_TEMPLATE, Tokenizer
    from megaflow.models.gpt import use_transformer_engine
    from megaflow.algorithms.base import pad_multiple
    from megaflow.training.engine import Trainer

    packed, seq, batch = spec["mode"] == "packed", spec["seq"], spec["batch"]
    cfg = _megaflow_setup(spec, seq, batch, Path(spec["dir"]) / "run")
    t0 = time.perf_counter()
    ckpt = Path(spec["ckpt"])
    tok = Tokenizer.load(ckpt / "tokenizer")
    prepared = sft.prepare([str(DATA)], tok, sft.SFTDataOptions(seq_length=seq, packing=packed))
    assert not prepared.added_tokens and prepared.template.source == TEMPLATE
    ref = ChatTemplate(tok, CHAT_TEMPLATE)  # the marks change nothing: the built-in template's ids and masks
    assert all((e := ref.encode(x.messages)).ids == x.ids.tolist() and e.assistant_mask == x.mask.tolist()
               for x in prepared.samples[:200])
    data = sft.SFTDataset(prepared.samples, seq, tok.pad_id, packed)
    trainer = Trainer(cfg, SFTTask(), VOCAB, Path(spec["dir"]) / "run" / "sft")
    trainer.init_weights_from(ckpt)
    stats, ends, losses = [], [], []

    class Counted(MicroBatches):
        def __next__(self):
            b = super().__next__()
            n = int(b["segment_ids"].amax(1).sum())
            stats.append(_batch_stats((b["segment_ids"] > 0).sum() + n, n, b["loss_mask"].sum(), b["tokens"].numel()))
            return b

    common.clock_train_step(trainer, ends, losses)
    build_s = time.perf_counter() - t0
    trainer.train(lambda consumed: [Counted(data, batch, 0, 1, consumed, SEED, packed, pad_multiple(cfg))], None)
    trainer.close()
    return {"ends": ends, "losses": losses, "stats": stats, "build_s": build_s,
            "info": {"rows": len(data), "packing_efficiency": data.packing_efficiency, "samples": len(prepared.samples),
                     "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
                     "layer_spec": "te" if use_transformer_engine() else "local"}}


def work_trl(spec: dict) -> dict:
    """TRL's SFTTrainer on the converted HF model: conversational data, assistant_only_loss, its own loop."""
    import importlib.util

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    packed, seq, batch = spec["mode"] == "packed", spec["seq"], spec["batch"]
    gpu = torch.cuda.is_available()
    t0 = time.perf_counter()
    records = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                               {"role": "assistant", "content": r["response"]}]} for r in records])
    attn = "flash_attention_2" if gpu and importlib.util.find_spec("flash_attn") else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], attn_implementation=attn, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["hf"])
    extra = dict(packing=True, packing_strategy="bfd", max_length=seq, shuffle_dataset=False) if packed else \
        dict(packing=False, max_length=seq)
    in_order = not packed and "train_sampling_strategy" in trl.SFTConfig.__dataclass_fields__  # transformers >= 5.x
    extra |= {"train_sampling_strategy": "sequential"} if in_order else {}
    args = trl.SFTConfig(
        output_dir=str(Path(spec["dir"]) / "trl"), max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=batch // spec.get("accum", 1), gradient_accumulation_steps=spec.get("accum", 1),
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch_fused" if gpu else "adamw_torch",
        bf16=spec["precision"] == "bf16", gradient_checkpointing=False, use_cpu=not gpu, seed=SEED, data_seed=SEED,
        assistant_only_loss=True, report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True,
        dataloader_num_workers=0, **extra)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    if not packed and not in_order:  # an older transformers: the same order by hand
        trainer._get_train_sampler = lambda *_, **__: torch.utils.data.SequentialSampler(trainer.train_dataset)
    stats, ends, losses = [], [], []

    def batch_stats(b):
        if "attention_mask" in b:  # padded rows
            n, tokens = b["input_ids"].shape[0], b["attention_mask"].sum()
        else:  # padding-free: one flattened sequence, position_ids restart at 0 per sample
            n, tokens = (b["position_ids"] == 0).sum(), b["position_ids"].shape[1]
        return _batch_stats(tokens, n, (b["labels"][:, 1:] != -100).sum(), b["input_ids"].numel())

    common.clock_hf_trainer(trainer, ends, losses, stats, batch_stats)
    build_s = time.perf_counter() - t0
    trainer.train()
    k = args.gradient_accumulation_steps  # micro-batches -> optimizer steps (each loss is sum / step's loss tokens)
    losses = [sum(losses[i:i + k]) for i in range(0, len(losses), k)]
    stats = [{f: sum(s[f] for s in stats[i:i + k]) for f in stats[0]} for i in range(0, len(stats) - k + 1, k)]
    return {"ends": ends, "losses": losses, "stats": stats, "build_s": build_s,
            "info": {"rows": len(trainer.train_dataset), "attn_implementation": model.config._attn_implementation,
                     "padding_free": bool(trainer.padding_free), "optimizer": args.optim, "trl": trl.__version__,
                     "recompute": bool(getattr(model, "is_gradient_checkpointing", False))}}


def run_worker(spec: dict) -> None:
    if spec["impl"] in ("init", "megaflow"):
        import megatron.core  # noqa: F401  before any cuDNN op (Transformer Engine, ../shared/gpu/README.md)
    out = {"init": work_init, "megaflow": work_megaflow, "trl": work_trl}[spec["impl"]](spec)
    common.emit_result(out if spec["impl"] == "init" else common.finish_worker(out, spec["warmup"]))


# ---------------------------------------------------------------------------------------------- parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="megaflow SFT vs TRL SFTTrainer: tokens/s, side by side",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Usage:")[1])
    p.add_argument("--shape", choices=sorted(common.SHAPES), help="default: small on CPU, 1b on GPU")
    p.add_argument("--seq", type=int, help="packed row length (TRL: max_length)")
    p.add_argument("--batch", type=int, help="packed rows per optimizer step")
    p.add_argument("--unpacked-seq", type=int, help="unpacked row length (megaflow's data.seq_length)")
    p.add_argument("--unpacked-batch", type=int, help="samples per step unpacked")
    p.add_argument("--trl-accum", type=int, help="also run TRL packed as this many accumulated micro-batches per step "
                                                 "(one flattened padding-free batch costs quadratic attention; 1: off)")
    p.add_argument("--modes", default="packed,unpacked")
    common.add_run_flags(p)
    a = p.parse_args(argv)
    if a.worker:
        return a
    import importlib.util

    common.resolve_run_flags(a, DEFAULTS, "bench_sft")
    a.unpacked_batch = a.unpacked_batch or max(1, a.batch * a.seq // a.unpacked_seq)
    a.trl_accum = a.trl_accum or (1 if importlib.util.find_spec("flash_attn") else a.batch)
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not a.modes or any(m not in MODES for m in a.modes):
        p.error(f"--modes: a comma list of {', '.join(MODES)}")
    if min(a.repeats, a.steps, a.warmup, a.seq, a.batch, a.unpacked_seq, a.unpacked_batch, a.trl_accum) < 1:
        p.error("--repeats, --steps, --warmup (the first step's end starts the clock) and sizes must be >= 1")
    if a.batch % a.trl_accum:
        p.error(f"--trl-accum {a.trl_accum} must divide --batch {a.batch}")
    return a


def variants(a) -> list[dict]:
    """Every row (mode, key, impl, settings, sizes), in the order each round runs them."""
    out = []
    for mode in a.modes:
        seq, batch = (a.seq, a.batch) if mode == "packed" else (a.unpacked_seq, a.unpacked_batch)
        v = dict(mode=mode, seq=seq, batch=batch)
        if mode == "packed":
            out += [v | dict(key="megaflow", impl="megaflow", settings=f"packing, {batch} rows of {seq}"),
                    v | dict(key="trl", impl="trl", settings=f"packing=True bfd (padding-free), {batch} rows of {seq}")]
            if a.trl_accum > 1:
                out.append(v | dict(key=f"trl-accum{a.trl_accum}", impl="trl", accum=a.trl_accum,
                                    settings=f"as above, {a.trl_accum} micro-batches of {batch // a.trl_accum} accumulated"))
        else:
            out += [v | dict(key="megaflow", impl="megaflow", settings=f"no packing, {batch} rows of {seq}, cut after the longest"),
                    v | dict(key="trl", impl="trl", settings=f"no packing, {batch} rows padded to the longest")]
    return out


def call(cmd: list[str], timeout: float, log: Path) -> tuple[int | str, str, str]:
    env = worker_env() | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                          "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = str(e.stdout or ""), str(e.stderr or "") + "\n[timed out]", "timeout"
    log.write_text(f"$ {' '.join(cmd[:4])} ...\n# rc={rc} wall={time.perf_counter() - t0:.1f}s\n--- stdout\n{out}\n"
                   f"--- stderr\n{err}")
    if rc != 0:
        print(f"  ! {log.stem} failed (rc={rc}); log {log}\n" + "\n".join(err.strip().splitlines()[-12:]), flush=True)
    return rc, out, err


def worker(spec: dict, timeout: float, log: Path) -> dict | None:
    rc, out, _ = call([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], timeout, log)
    return common.parse_result(out) if rc == 0 else None


def setup(a, tmp: Path, log_dir: Path) -> dict:
    """Tokenizer + megaflow's random init (a worker), then `megaflow convert megaflow-to-hf --verify`."""
    spec = {"impl": "init", "dir": str(tmp), "shape": a.shape, "seq": max(a.seq, a.unpacked_seq),
            "precision": a.precision, "warmup": 0, "steps": 1}
    init = worker(spec, a.worker_timeout, log_dir / "init.log")
    if init is None:
        raise SystemExit("setup failed: could not build the megaflow model")
    rc, out, err = call([sys.executable, "-m", "megaflow", "convert", "megaflow-to-hf", "--ckpt", init["ckpt"],
                         "--out", str(tmp / "hf"), "--verify", "--json"], a.worker_timeout, log_dir / "convert.log")
    if rc != 0:
        raise SystemExit(f"megaflow-to-hf failed: {err.strip().splitlines()[-1:]}")
    report = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return {"ckpt": init["ckpt"], "hf": str(tmp / "hf"), "convert": report[-1] if report else {}}


def summarize(a, results: list[dict]) -> dict:
    rows = {}
    for v in variants(a):
        runs = [r for r in results if (r["key"], r["mode"]) == (v["key"], v["mode"]) and not r.get("failed")]
        if not runs:
            rows[f"{v['mode']}/{v['key']}"] = v | {"failed": True}
            continue
        rate = [{k: sum(s[k] for s in r["stats"][a.warmup:]) / sum(r["times"]) for k in r["stats"][0]} for r in runs]
        rows[f"{v['mode']}/{v['key']}"] = v | {
            **{f"{k}_per_s": common.median([x[k] for x in rate]) for k in rate[0]},
            "repeat_tokens_per_s": [x["tokens"] for x in rate], "repeats": len(runs),
            "median_step_s": common.median([common.median(r["times"]) for r in runs]),
            "tokens_per_step": common.median([s["tokens"] for s in runs[0]["stats"][a.warmup:]]),
            "first_loss": runs[0]["losses"][0], "last_loss": runs[0]["losses"][-1],
            "loss_tokens_per_step": [s["loss_tokens"] for s in runs[0]["stats"]], "info": runs[0]["info"]}
    for key, r in rows.items():
        mf = rows.get(key.split("/")[0] + "/megaflow", {"failed": True})
        if r["impl"] == "trl" and not r.get("failed") and not mf.get("failed"):
            r |= {"megaflow_over_this": mf["tokens_per_s"] / r["tokens_per_s"],
                  "first_loss_diff_vs_megaflow": abs(mf["first_loss"] - r["first_loss"]),
                  "same_loss_tokens_per_step": mf["loss_tokens_per_step"] == r["loss_tokens_per_step"]}
    return rows


def print_tables(rows: dict, setup_info: dict, loads: list[float]) -> None:
    table = [["megaflow SFT" if r["impl"] == "megaflow" else "TRL SFTTrainer", r["mode"], r["settings"]]
             + (["failed", "", "", "", ""] if r.get("failed") else
                [f"{r['tokens_per_s']:,.0f}", f"{r['loss_tokens_per_s']:,.0f}", f"{r['tokens_per_step']:,.0f}",
                 f"{r['first_loss']:.5f}", f"{r['megaflow_over_this']:.2f}" if "megaflow_over_this" in r else ""])
             for r in rows.values()]
    print("\n" + common.format_table(["implementation", "mode", "settings", "tokens/s", "loss tokens/s", "tokens/step",
                                      "step-1 loss", "megaflow/this"], table))
    for r in rows.values():
        if "same_loss_tokens_per_step" in r:
            mf = rows[r["mode"] + "/megaflow"]["loss_tokens_per_step"]
            print(f"* {r['mode']} {r['key']}: loss tokens per step {r['loss_tokens_per_step']} (megaflow: "
                  + ("the same" if r["same_loss_tokens_per_step"] else f"{mf}: the batches differ")
                  + f"); step-1 loss |diff| {r['first_loss_diff_vs_megaflow']:.2e}")
    ok = [r for r in rows.values() if not r.get("failed")]
    best = {i: max((r for r in ok if r["impl"] == i), key=lambda r: r["tokens_per_s"], default=None) for i in IMPLS}
    if best["megaflow"] and best["trl"]:
        print(f"* best vs best: megaflow {best['megaflow']['mode']} / TRL {best['trl']['mode']} {best['trl']['key']}: "
              f"{best['megaflow']['tokens_per_s'] / best['trl']['tokens_per_s']:.2f}")
    print(f"* weights: megaflow's random init -> megaflow-to-hf --verify: max |logit diff| "
          f"{setup_info['convert'].get('max_abs_logit_diff')}")
    print("* tokens/s: the samples' tokens (no padding) per second of whole steps; megaflow/this: ratio of tokens/s")
    if loads:
        print(f"* 1-min load average after each worker: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} CPUs")


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        run_worker(json.loads(a.worker))
        return 0
    m = common.read_shape(a.shape)
    print(f"bench_sft: device={a.device} shape={a.shape} (h{m['hidden_size']} L{m['num_layers']} ffn{m['ffn_hidden_size']}"
          f", vocab {VOCAB}) {a.precision}; {a.repeats} rounds x {a.steps} steps (+{a.warmup} warm-up) of", flush=True)
    for v in variants(a):
        print(f"  {v['mode']:<8} {v['key']:<10} {v['settings']}", flush=True)
    if a.dry_run:
        print("  megaflow overrides: " + " ".join(megaflow_overrides(vars(a), a.seq, a.batch)))
        print("dry run: nothing executed")
        return 0
    out = Path(a.out) if Path(a.out).is_absolute() else REPO_ROOT / a.out
    log_dir = out.parent / (out.stem + "-logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    tmp, started, results, round_s = Path(tempfile.mkdtemp(prefix="bench-sft-")), time.time(), [], 0.0
    try:
        setup_info = setup(a, tmp, log_dir)
        print(f"  setup (tokenizer, init, megaflow-to-hf --verify) done in {time.time() - started:.0f} s", flush=True)
        record = {"benchmark": "bench_sft", "date": common.now_iso(), "setup": {"convert": setup_info["convert"]},
                  "args": {k: v for k, v in vars(a).items() if k != "worker"}}
        for rep in range(a.repeats):
            if rep and a.max_minutes and time.time() - started + round_s > 60 * a.max_minutes:
                print(f"stopping after {rep} rounds: --max-minutes {a.max_minutes} would be exceeded", flush=True)
                break
            t_round = time.time()
            print(f"round {rep + 1}/{a.repeats}", flush=True)
            for v in variants(a):
                d = tmp / f"{v['key']}-{v['mode']}-{rep}"
                spec = v | {"shape": a.shape, "dir": str(d), "precision": a.precision, "warmup": a.warmup,
                            "steps": a.steps, "ckpt": setup_info["ckpt"], "hf": setup_info["hf"]}
                r = worker(spec, a.worker_timeout, log_dir / f"{v['mode']}-{v['key']}-r{rep}.log")
                shutil.rmtree(d, ignore_errors=True)
                results.append((r or {"failed": True}) | {"key": v["key"], "mode": v["mode"], "repeat": rep})
                if r:
                    tok = sum(s["tokens"] for s in r["stats"][a.warmup:]) / sum(r["times"])
                    print(f"  {v['mode']:<8} {v['key']:<10} {tok:8,.0f} tokens/s, {1000 * common.median(r['times']):7.1f}"
                          f" ms/step (loss {r['losses'][0]:.5f} -> {r['losses'][-1]:.5f})", flush=True)
            round_s = time.time() - t_round
            record |= {"env": next((r["env"] for r in results if not r.get("failed")), {}), "results": results,
                       "summary": summarize(a, results), "elapsed_s": time.time() - started}
            out.write_text(json.dumps(record, indent=1) + "\n")  # after every round, so a cut-off run keeps its data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if all(r.get("failed") for r in results):
        print(f"every worker failed; see {log_dir}")
        return 1
    print_tables(record["summary"], setup_info, [r["loadavg_1min"] for r in results if not r.get("failed")])
    print(f"\nJSON -> {out} (logs in {log_dir}); {time.time() - started:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
