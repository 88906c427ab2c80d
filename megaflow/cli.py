"""The `megaflow` command. Thin: parses arguments and calls into the package.

User errors (bad config, bad data, missing files) print one line `megaflow: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from megaflow.errors import RunFailed, UserError

STAGES = ("pretrain",)  # sft, rm, dpo, ppo, grpo follow (DESIGN §5)


def _add_launch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc-per-node", type=int, default=None, metavar="N",
        help="start N processes on this node under torch.distributed.run (torchrun and srun need no flag)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaflow",
        description="Pretrain, fine-tune and align decoder-only language models on megatron-core.",
        epilog="Run `megaflow COMMAND --help` for the options of one command. Docs: README.md and docs/.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", help="train one stage from a config file",
                       description="Train one stage. Writes run.dir/STAGE/{config.yaml,metrics.jsonl,eval.json,checkpoints/,final/}.")
    p.add_argument("stage", choices=STAGES, help="the stage to train")
    p.add_argument("--config", "-c", required=True, help="stage YAML file (may `extends:` others)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, anywhere on the line, e.g. train.steps=50 parallel.tp=2")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")
    _add_launch(p)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on local text files",
                        description="Train a byte-level BPE (HF tokenizers) with megaflow's reserved special tokens "
                                    "(end of document, padding, chat roles, end of turn).")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help="text, jsonl(.gz) or parquet files")
    t.add_argument("--vocab-size", type=int, required=True, metavar="N")
    t.add_argument("--output", required=True, metavar="DIR", help="directory to write tokenizer.json and tokenizer_config.json")
    t.add_argument("--field", default="text", help="jsonl/parquet field holding the text (default: text)")

    p = sub.add_parser("preprocess", help="tokenize text into megatron indexed .bin/.idx files",
                       description="Stream text, jsonl(.gz) or parquet files through a tokenizer into PREFIX.bin/PREFIX.idx, "
                                   "one document per blank-line-separated block (text) or record (jsonl/parquet), each "
                                   "followed by the end-of-document token.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="a directory with tokenizer.json, or a SentencePiece .model")
    p.add_argument("--output", required=True, metavar="PREFIX")
    p.add_argument("--workers", type=int, default=1, metavar="N")
    p.add_argument("--field", default="text", help="jsonl/parquet field holding the text (default: text)")
    p.add_argument("--split-documents", choices=("blank_line", "none"), default="blank_line",
                   help="how plain text files are split into documents (default: at blank lines)")
    p.add_argument("--invalid-utf8", choices=("replace", "error"), default="replace",
                   help="replace undecodable bytes with U+FFFD and count them (default), or stop with an error")

    p = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Evaluate a final or training checkpoint on a text file or indexed dataset.")
    p.add_argument("ckpt", help="a final/ directory or a checkpoints/iter_N directory")
    p.add_argument("--data", default=None,
                   help="text/jsonl/parquet file or indexed .bin/.idx prefix (default: the checkpoint's own validation split)")
    p.add_argument("--metrics", default="ppl", help="comma-separated metrics (available: ppl)")
    p.add_argument("--seq-length", type=int, default=None, help="sequence length (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-batches", type=int, default=None, help="evaluate at most this many batches")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    p = sub.add_parser("inspect", help="show what a checkpoint holds and whether it is complete",
                       description="Stage, step, tokens seen, model config, tokenizer, parallel layout at save time, "
                                   "sizes, parents, and completeness (every file checked against the manifest's "
                                   "sizes and CRC-32). Accepts a checkpoint, or a stage directory (its final/, else latest).")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    p.add_argument("--no-checksums", action="store_true", help="check sizes only (fast on large checkpoints)")

    p = sub.add_parser(
        "plan", help="parameters, memory per GPU and compute budget of a config, from formulas",
        description="Parameters, memory per GPU (weights, grads, optimizer state, activations) under the "
                    "config's parallel layout and recomputation, whether it fits the GPU, and training FLOPs, "
                    "GPU-hours and cost for a token budget. Formulas: megaflow/plan.py and docs/parallelism.md. "
                    "Example: megaflow plan configs/models/llama3.1-70b.yaml precision=bf16 parallel.tp=8 "
                    "parallel.pp=4 --seq-length 8192 --gpus 64 --tokens 15e12")
    p.add_argument("config", help="a stage YAML file, or a model preset such as configs/models/llama3.1-8b.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. precision=bf16 parallel.tp=8 parallel.recompute=selective")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="world size; dp = N / (tp*pp*cp) (default: tp*pp*cp*dp, dp from parallel.dp or 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="memory of one GPU, GiB, for the fits / does-not-fit verdict (default: 80)")
    p.add_argument("--seq-length", type=int, default=None, metavar="S",
                   help="sequence length (default: data.seq_length if the config sets it, else "
                        "model.max_position_embeddings)")
    p.add_argument("--tokens", type=float, default=None, metavar="D",
                   help="training token budget, e.g. 300e9 (default: train.steps * global_batch_size * seq)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                   help="peak TFLOP/s of one GPU (default, H100 SXM dense: 989 bf16, 1979 fp8, 67 fp32)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation, 0-1 (default: 0.4)")
    p.add_argument("--price", type=float, default=None, metavar="P", help="price of one GPU-hour, for the cost line")
    p.add_argument("--attention", choices=("flash", "unfused"), default="flash",
                   help="flash (TE fused attention, the GPU default) stores no s*s scores; unfused (the CPU "
                        "local spec) stores them (default: flash)")
    p.add_argument("--overhead", type=float, default=3.0, metavar="GIB",
                   help="fixed allowance per GPU for CUDA context, workspaces and fragmentation (default: 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    return parser


def _relaunch(nproc: int) -> int:
    """Re-run this very command under torch.distributed.run with N processes on this node."""
    import subprocess

    argv = [a for a in sys.argv[1:]]
    i = argv.index("--nproc-per-node") if "--nproc-per-node" in argv else None
    if i is not None:
        del argv[i : i + 2]
    else:
        argv = [a for a in argv if not a.startswith("--nproc-per-node=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megaflow", *argv]
    return subprocess.call(cmd)


def _cmd_train(args) -> int:
    from megaflow.config import load_config

    cfg = load_config(args.config, args.overrides, defaults={"stage": args.stage})
    if args.dry_run:
        from megaflow.config import dump_config

        print(dump_config(cfg), end="")
        return 0
    if args.nproc_per_node and args.nproc_per_node > 1 and "RANK" not in os.environ:
        try:
            cfg.check_layout(args.nproc_per_node)  # one clear line here rather than one per rank
        except ValueError as e:
            raise UserError(f"--nproc-per-node {args.nproc_per_node}: {e}") from None
        if cfg.parallel.cp > 1:
            import torch

            if not torch.cuda.is_available():
                raise UserError("parallel.cp > 1 needs GPUs: megatron's local (CPU) attention has no context parallelism")
        return _relaunch(args.nproc_per_node)
    from megaflow.algorithms import pretrain

    pretrain.main(cfg)
    return 0


def _cmd_tokenizer(args) -> int:
    from megaflow.data.tokenizer import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.output, field=args.field)
    print(f"tokenizer: {tok.vocab_size} tokens -> {args.output}")
    return 0


def _cmd_preprocess(args) -> int:
    from megaflow.data.preprocess import preprocess

    stats = preprocess(
        args.input, args.tokenizer, args.output, workers=args.workers, field=args.field,
        split_documents_on=args.split_documents, invalid_utf8=args.invalid_utf8,
    )
    print(stats.summary())
    return 0


def _cmd_eval(args) -> int:
    from megaflow.eval.perplexity import evaluate_checkpoint

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = set(metrics) - {"ppl"}
    if unknown:
        raise UserError(f"--metrics: unknown metric(s) {', '.join(sorted(unknown))} (available: ppl)")
    result = evaluate_checkpoint(args.ckpt, args.data, seq_length=args.seq_length, batch_size=args.batch_size,
                                 max_batches=args.max_batches, quiet=args.json)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


def _cmd_inspect(args) -> int:
    from megaflow.training.inspect import format_report, inspect_checkpoint

    info = inspect_checkpoint(args.ckpt, verify_checksums=not args.no_checksums)
    print(json.dumps(info) if args.json else format_report(info))
    return 0 if info["complete"] else 1


def _cmd_plan(args) -> int:
    from megaflow import plan

    cfg = plan.load_plan_config(args.config, args.overrides, seq_length=args.seq_length)
    result = plan.make_plan(cfg, gpus=args.gpus, gpu_memory_gib=args.gpu_memory, tokens=args.tokens,
                            peak_tflops=args.peak_tflops, mfu=args.mfu, price=args.price,
                            flash_attention=args.attention == "flash", overhead_gib=args.overhead)
    print(json.dumps(result.to_dict()) if args.json else plan.format_plan(result, title=f"{args.config}\n"))
    return 0


COMMANDS = {"inspect": _cmd_inspect, "plan": _cmd_plan, "train": _cmd_train, "tokenizer": _cmd_tokenizer, "preprocess": _cmd_preprocess, "eval": _cmd_eval}


def _quiet_known_warnings() -> None:
    """megatron-core announces every optional kernel it falls back from (apex, TE) and its experimental
    APIs at import; on a CPU these are expected, and they bury the progress bar."""
    import logging
    import warnings

    for pattern in (r".*(Apex|Transformer Engine and Apex) (is|are) not installed.*", r".*is experimental.*",
                    r".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("torch.utils.cpp_extension", "megatron.core.dist_checkpointing.strategies.torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    _quiet_known_warnings()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may stand anywhere (argparse stops collecting positionals at the first option).
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # every rank fails alike: say it once
            print(f"megaflow: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"megaflow: stopped: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("megaflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
