"""Rollout tokens/s: megaflow's KV-cache sampler (what PPO/GRPO generate with) vs HF transformers' generate() on
the same converted model, prompts and lengths, side by side.

Setup (tools/bench_sft.py's): a byte-level BPE on the sample corpus with megaflow's chat template, a
`--shape` model randomly initialised by megaflow and converted with `megaflow convert megaflow-to-hf
--verify`, so both sides hold equal weights. Prompts: the first --batch prompts of
data/sample/sft-words/train.jsonl rendered with the chat template and its generation prompt (18-25 tokens).
Both sides sample at temperature 1 (no top-k/top-p) exactly --new tokens per prompt (no stop token: an
untrained model would stop at random), batched: megaflow right-pads to true positions (its prefill runs to
the shortest prompt), HF left-pads (its usual batched generation). Each side runs in a process of its own,
--warmup untimed batches then --repeats timed ones, interleaved over --rounds; medians. Tokens/s counts
generated tokens only.

The floor: a decode step must read every weight it multiplies by (all but the input embedding table) and
the KV cache written so far, so at the device's memory bandwidth (measured here with a large copy) a
batch of B rows cannot make more than B / ((weight bytes + KV bytes) / bandwidth) tokens per second; the
KV bytes are averaged over the decode's positions. Printed next to the measured rate.

Usage:
    python tools/bench_rollout.py                      # CPU: small shape, fp32
    python tools/bench_rollout.py --shape tiny --rounds 1
    python3 tools/bench_rollout.py --shape 1b          # GPU, bf16
JSON: --out (default bench-results/bench_rollout.json, or $OUT/bench_rollout.json when $OUT is a folder).
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
import bench_sft  # noqa: E402  (its setup: tokenizer, random init, conversion)

REPO_ROOT = common.REPO_ROOT
PROMPTS = REPO_ROOT / "data" / "sample" / "sft-words" / "train.jsonl"
IMPLS = ("megaflow", "hf")


def _prompt_ids(tokenizer_dir: str, n: int) -> list[list[int]]:
    from megaflow.data.chat import ChatTemplate
    from megaflow.data.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    template = ChatTemplate(tok, tok.chat_template)
    records = [json.loads(line) for line in PROMPTS.read_text().splitlines()[:n]]
    return [template.prompt_ids([{"role": "user", "content": r["prompt"]}]) for r in records]


def _timed(run, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        common.synchronize()
        t0 = time.perf_counter()
        run()
        common.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def memory_bandwidth(device, gib: float) -> float:
    """Bytes/s of a device-to-device copy of `gib` GiB (it reads and writes each byte: 2 x size / time)."""
    import torch

    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(4):
        common.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        common.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / min(times[1:])


def decode_floor(model, prompts: list[list[int]], new: int, bandwidth: float) -> dict:
    """Tokens/s a decode step could reach if reading the weights and the KV cache were all it did."""
    import torch

    inner = model.chunks[0]
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for name, p in inner.named_parameters()
                       if "word_embeddings" not in name or inner.share_embeddings_and_output_weights)
    element = 2 if cfg.params_dtype in (torch.bfloat16, torch.float16) else 4
    kv_per_position = 2 * cfg.num_layers * cfg.num_query_groups * cfg.kv_channels * element
    mean_position = sum(len(p) for p in prompts) / len(prompts) + new / 2
    step_bytes = weight_bytes + kv_per_position * mean_position * len(prompts)
    return {"weight_bytes": weight_bytes, "kv_bytes_per_step": step_bytes - weight_bytes,
            "bandwidth_gb_s": bandwidth / 1e9, "floor_tok_per_s": len(prompts) * bandwidth / step_bytes}


def work_megaflow(spec: dict) -> dict:
    from megaflow.inference import SamplingParams, generate, load_for_inference

    model = load_for_inference(spec["ckpt"], precision=spec["precision"])
    prompts = _prompt_ids(str(Path(spec["ckpt"]) / "tokenizer"), spec["batch"])
    params = SamplingParams(max_new_tokens=spec["new"], temperature=1.0, stop_token_ids=[], seed=1)
    got = []
    times = _timed(lambda: got.append(generate(model, prompts, params)), spec["warmup"], spec["repeats"])
    assert all(len(c.token_ids) == spec["new"] for c in got[-1])
    floor = decode_floor(model, prompts, spec["new"], memory_bandwidth(model.device, 4.0 if model.device.type == "cuda" else 0.5))
    return {"times": times, "tokens": spec["batch"] * spec["new"], "floor": floor}


def work_hf(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if spec["precision"] == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(spec["hf"], dtype=dtype).to(device).eval()
    prompts = _prompt_ids(str(Path(spec["ckpt"]) / "tokenizer"), spec["batch"])
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    torch.manual_seed(1)

    def run():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=spec["new"], min_new_tokens=spec["new"], use_cache=True,
                                 pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == width + spec["new"]
    return {"times": _timed(run, spec["warmup"], spec["repeats"]), "tokens": spec["batch"] * spec["new"],
            "attn_implementation": model.config._attn_implementation}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Usage:")[1])
    p.add_argument("--shape", choices=sorted(common.SHAPES), help="default: small on CPU, 1b on GPU")
    p.add_argument("--batch", type=int, default=64, help="prompts per generate() call")
    p.add_argument("--new", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        spec = json.loads(a.worker)
        if spec["impl"] == "megaflow":
            import megatron.core  # noqa: F401
        out = work_megaflow(spec) if spec["impl"] == "megaflow" else work_hf(spec)
        common.emit_result(out)
        return 0
    import torch

    gpu = torch.cuda.is_available()
    a.shape = a.shape or ("1b" if gpu else "small")
    precision = "bf16" if gpu else "fp32"
    out_path, log_dir = common.result_paths(a.out, "bench_rollout")
    with tempfile.TemporaryDirectory(prefix="bench_rollout-") as tmp:
        setup_args = argparse.Namespace(shape=a.shape, seq=256, unpacked_seq=256, precision=precision, worker_timeout=900.0)
        info = bench_sft.setup(setup_args, Path(tmp), log_dir)
        results = {impl: [] for impl in IMPLS}
        floors = []
        for rnd in range(a.rounds):
            for impl in IMPLS:
                spec = {"impl": impl, "ckpt": info["ckpt"], "hf": info["hf"], "batch": a.batch, "new": a.new,
                        "precision": precision, "warmup": a.warmup, "repeats": a.repeats}
                rc, stdout, _ = bench_sft.call([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                               900.0, log_dir / f"{impl}-{rnd}.log")
                got = common.parse_result(stdout) if rc == 0 else None
                if got is None:
                    raise SystemExit(f"{impl} failed; log {log_dir / f'{impl}-{rnd}.log'}")
                results[impl] += [got["tokens"] / t for t in got["times"]]
                floors += [got["floor"]] if "floor" in got else []
    speed = {impl: common.median(v) for impl, v in results.items()}
    ratio = speed["megaflow"] / speed["hf"]
    floor = floors[-1] | {"floor_tok_per_s": common.median([f["floor_tok_per_s"] for f in floors])}
    print(common.format_table(["impl", "generated tok/s (median)", "runs"],
                              [[impl, f"{speed[impl]:.0f}", str(len(results[impl]))] for impl in IMPLS]
                              + [["read floor", f"{floor['floor_tok_per_s']:.0f}", str(len(floors))]]))
    print(f"read floor: {floor['weight_bytes'] / 1e9:.3f} GB of weights + {floor['kv_bytes_per_step'] / 1e9:.3f} GB of "
          f"KV cache per step at {floor['bandwidth_gb_s']:.0f} GB/s; megaflow at "
          f"{speed['megaflow'] / floor['floor_tok_per_s']:.1%} of it")
    print(f"megaflow / HF generate(): {ratio:.2f}x  (shape {a.shape}, {precision}, batch {a.batch}, {a.new} new tokens; "
          f"conversion max |logit diff| {info['convert'].get('max_abs_logit_diff')})")
    record = {"benchmark": "bench_rollout", "date": common.now_iso(), "shape": a.shape, "precision": precision,
              "batch": a.batch, "new_tokens": a.new, "tok_per_s": speed, "samples": results, "ratio_megaflow_hf": ratio,
              "read_floor": floor,
              "env": common.env_info(), "convert": info["convert"]}
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
