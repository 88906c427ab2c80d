"""Where a pretraining step's time goes, megaflow against HF transformers (and bare megatron-core), by kind.

Each implementation is built exactly as tools/bench_pretrain.py builds it (the same shape, batch, optimizer
and attention), warmed up, then run for `--steps` more steps with every aten op timed around the op itself
(a TorchDispatchMode: forward, backward and optimizer alike; intra-op threads run inside the op, so
nothing is counted twice). Each op goes to one kind:

  matrix multiplies    aten.mm / addmm / bmm / baddbmm
  attention            torch's scaled_dot_product_attention kernels
  logits and loss      any other op on a tensor with a vocabulary-sized last dimension (softmax,
                       cross-entropy and their gradients)
  other tensor ops     the rest: norms, RoPE, SwiGLU, residual adds, copies, optimizer, gradient buffers

The timed ops sum to about the step's wall time, which is printed beside them (measured without the
timer; the timer's own cost, a few microseconds per op, is in the op times). Repeats are interleaved,
each in a process of its own; the table holds the median over repeats.

Usage:
    python tools/profile_step.py                       # CPU: megaflow and hf, small shape, 3 repeats
    python tools/profile_step.py --impl megaflow,mcore,hf --repeats 5 --top 12
Options: --impl  --repeats R  --steps N  --top K (the largest "other" ops per implementation)
--out FILE (default bench-results/profile_step.json); the shape flags of bench_pretrain.py
(--shape --seq --micro-batch --num-microbatches).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common
import bench_pretrain

KINDS = ("matrix multiplies", "attention", "logits and loss", "other tensor ops")
GEMMS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}


def kind_of(name: str, tensors: list, vocab: int) -> str:
    """The kind of one aten op (see the module docstring), from its name and its tensor arguments."""
    if name in GEMMS:
        return "matrix multiplies"
    if "scaled_dot_product" in name:
        return "attention"
    if any(t.ndim and t.shape[-1] == vocab for t in tensors):
        return "logits and loss"
    return "other tensor ops"


def run_worker(spec: dict) -> None:
    impl = spec["impl"]
    if impl != "hf":
        import megatron.core  # noqa: F401  (as bench_pretrain's worker)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    tokens = common.make_tokens(spec["shape"]["vocab_size"], spec["num_microbatches"], spec["micro_batch"],
                                spec["seq"], bench_pretrain.DATA_SEED)
    build = {"hf": bench_pretrain.build_hf, "mcore": bench_pretrain.build_mcore}.get(impl, bench_pretrain.build_megaflow)
    step = build(spec, tokens)
    times, _ = common.time_steps(step, 2, spec["steps"])
    per_kind = dict.fromkeys(KINDS, 0.0)
    per_op: dict[str, float] = {}

    class OpTimer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            t0 = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            ms = 1000 * (time.perf_counter() - t0) / spec["steps"]
            name = str(func.overloadpacket)
            flat = [x for a in args for x in (a if isinstance(a, (list, tuple)) else [a])]
            kind = kind_of(name, [x for x in flat if isinstance(x, torch.Tensor)], spec["vocab"])
            per_kind[kind] += ms
            if kind == "other tensor ops":
                per_op[name] = per_op.get(name, 0.0) + ms
            return out

    with OpTimer():
        for _ in range(spec["steps"]):
            step()
    if hasattr(step, "cleanup"):
        step.cleanup()
    common.emit_result({"impl": impl, "wall_ms": 1000 * common.median(times), "kinds_ms": per_kind,
                        "other_ops_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="a pretraining step's time by kind: megaflow vs HF (vs bare megatron-core)",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("Usage:")[1])
    p.add_argument("--impl", default="megaflow,hf", help="a comma list of megaflow, mcore, hf")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--shape", default="small", choices=sorted(common.SHAPES))
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--num-microbatches", type=int, default=2)
    p.add_argument("--out", default=str(common.REPO_ROOT / "bench-results" / "profile_step.json"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.impls = [i.strip() for i in a.impl.split(",") if i.strip()]
    bad = [i for i in a.impls if i not in ("megaflow", "mcore", "hf")]
    if bad:
        p.error(f"--impl: unknown {bad}; expected megaflow, mcore or hf")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        run_worker(json.loads(a.worker))
        return 0
    # the benchmark's own plan: megaflow's config for this shape, fp32 on a CPU
    bench = bench_pretrain.parse_args(["--device", "cpu", "--shape", a.shape, "--seq", str(a.seq), "--micro-batch",
                                       str(a.micro_batch), "--num-microbatches", str(a.num_microbatches)])
    cfg = bench_pretrain.plan(bench)["configs"][0]
    results: dict[str, list[dict]] = {i: [] for i in a.impls}
    t0 = time.perf_counter()
    for rep in range(a.repeats):
        for impl in a.impls:
            spec = {"impl": impl, "precision": cfg["precision"], "overrides": cfg["overrides"], "shape": cfg["shape"],
                    "vocab": cfg["vocab"], "micro_batch": a.micro_batch, "seq": a.seq,
                    "num_microbatches": a.num_microbatches, "steps": a.steps, "hf_bf16": "autocast"}
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=False, capture_output=True,
                                  text=True, env=bench_pretrain.worker_env(), cwd=common.REPO_ROOT)
            result = common.parse_result(proc.stdout) if proc.returncode == 0 else None
            if result is None:
                print(f"{impl} repeat {rep} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[impl].append(result)
            print(f"  {impl:<9} repeat {rep}: {result['wall_ms']:7.1f} ms/step", flush=True)

    def med(impl, key, sub=None):
        return common.median([r[key][sub] if sub else r[key] for r in results[impl]])

    names = {"megaflow": "megaflow", "mcore": "bare mcore", "hf": "HF"}
    print(f"\nms per step, median of {a.repeats} repeats x {a.steps} timed steps ({a.shape} shape, seq {a.seq}, "
          f"micro-batch {a.micro_batch} x {a.num_microbatches}; {time.perf_counter() - t0:.0f} s in all)\n")
    print("| kind | " + " | ".join(names[i] for i in a.impls) + " |")
    print("|---|" + "--:|" * len(a.impls))
    for kind in KINDS:
        print(f"| {kind} | " + " | ".join(f"{med(i, 'kinds_ms', kind):.1f}" for i in a.impls) + " |")
    print("| **all timed ops** | " + " | ".join(
        f"**{common.median([sum(r['kinds_ms'].values()) for r in results[i]]):.1f}**" for i in a.impls) + " |")
    print("| step wall time, untimed | " + " | ".join(f"{med(i, 'wall_ms'):.1f}" for i in a.impls) + " |")
    for impl in a.impls:
        ops = results[impl][0]["other_ops_ms"]
        top = sorted(ops, key=lambda op: -common.median([r["other_ops_ms"].get(op, 0.0) for r in results[impl]]))[:a.top]
        print(f"\n{names[impl]}, largest other ops: " + ", ".join(
            f"{op.removeprefix('aten.')} {common.median([r['other_ops_ms'].get(op, 0.0) for r in results[impl]]):.1f}"
            for op in top))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(a), "results": results, "env": common.env_info()}, indent=1))
    print(f"\nJSON -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
