"""The `megaflow` command. Thin: parses arguments and calls into the package.

User errors (bad config, bad data, missing files) print one line `megaflow: error: ...` and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from megaflow.algorithms import registry
from megaflow.errors import RunFailed, UserError


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in megaflow's one-line form (`megaflow: error: ...`, exit 2)."""

    def error(self, message: str):
        where = self.prog.removeprefix("megaflow").strip()
        self.exit(2, f"megaflow: error: {where + ': ' if where else ''}{message} (see `{self.prog} --help`)\n")


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its message: "invalid int value"
    return parse


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _add_launch(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nproc-per-node", type=_at_least(1), default=None, metavar="N",
        help="start N processes on this node under torch.distributed.run (torchrun and srun need no flag)",
    )


def _add_no_checksums(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-checksums", action="store_true",
                   help="check the sizes of a checkpoint's files only, not their CRC-32 (fast on large "
                        "checkpoints; the same as MEGAFLOW_NO_CHECKSUMS=1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="megaflow",
        description="Pretrain, fine-tune and align decoder-only language models on megatron-core.",
        epilog="Run `megaflow COMMAND --help` for the options of one command. Docs: README.md and docs/.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "run", help="run a pipeline of stages (pretrain -> sft -> rm -> dpo -> eval), resumable, with a report",
        description="Run the stages of a pipeline file in dependency order. run.dir/pipeline.json records each "
                    "stage's config and input hashes, status, timings and metrics; running again skips what is "
                    "done and unchanged, resumes what was interrupted, and reruns a changed stage and what "
                    "depends on it. Gates stop the pipeline when a stage's metrics fall short. Writes "
                    "run.dir/report.md and run.dir/plots/. See docs/pipeline.md.")
    p.add_argument("pipeline", help="pipeline YAML file (configs/pipelines/tiny.yaml is the embedded one)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="STAGE.key=value for a stage (sft.train.steps=50) or run.key=value for the pipeline")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--from", dest="start_from", metavar="STAGE", help="run STAGE and every stage after it")
    which.add_argument("--only", metavar="STAGE", help="run STAGE alone (the stages it reads must be done)")
    p.add_argument("--dry-run", action="store_true", help="check the pipeline and print what would run and why")
    p.add_argument("--nproc-per-node", type=_at_least(1), default=None, metavar="N",
                   help="processes of every training stage that sets no nproc_per_node of its own")
    _add_no_checksums(p)

    p = sub.add_parser("train", help="train one stage from a config file",
                       description="Train one stage. Writes run.dir/STAGE/{config.yaml,metrics.jsonl,eval.json,checkpoints/,final/}.")
    p.add_argument("stage", choices=registry.TRAINING, help="the stage to train")
    p.add_argument("--config", "-c", required=True, help="stage YAML file (may `extends:` others)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, anywhere on the line, e.g. train.steps=50 parallel.tp=2")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")
    _add_launch(p)
    _add_no_checksums(p)

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
    p.add_argument("--workers", type=_at_least(1), default=1, metavar="N")
    p.add_argument("--field", default="text", help="jsonl/parquet field holding the text (default: text)")
    p.add_argument("--split-documents", choices=("blank_line", "none"), default="blank_line",
                   help="how plain text files are split into documents (default: at blank lines)")
    p.add_argument("--invalid-utf8", choices=("replace", "error"), default="replace",
                   help="replace undecodable bytes with U+FFFD and count them (default), or stop with an error")
    p.add_argument("--max-invalid-utf8", type=_fraction, default=0.01, metavar="FRACTION",
                   help="refuse a file whose invalid UTF-8 sequences and NUL bytes pass this share of its bytes "
                        "(a binary file or another encoding; default: 0.01, 1 accepts anything)")

    p = sub.add_parser("curate", help="filter and deduplicate raw text (quality filters, exact and MinHash dedup)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Stream text, jsonl(.gz) or parquet files through FineWeb's quality filters (HF datatrove: "
                                   "Gopher quality and repetition, C4, FineWeb line rules), a length and a language filter "
                                   "(py3langid), exact dedup (normalised text) and MinHash LSH near-dedup, into DIR/*.jsonl.gz. "
                                   "DIR/summary.json counts what each filter removed; DIR/examples.jsonl keeps a few removed "
                                   "documents per reason.",
                       epilog="examples:\n"
                              "  megaflow curate --input corpus.jsonl --output curated\n"
                              "  megaflow curate --input a.txt b.parquet --output curated --workers 8 filters.c4=null minhash.threshold=0.7\n"
                              "  megaflow curate --config configs/stages/curate-tiny.yaml executor=slurm slurm.partition=cpu\n"
                              "every key: docs/curation.md")
    p.add_argument("--input", nargs="+", metavar="FILE", help="files or directories of them (or `input` in --config)")
    p.add_argument("--output", metavar="DIR", help="the curated shards' directory (default: run.dir/curate/data)")
    p.add_argument("--workers", type=_at_least(1), metavar="N", help="local processes (default 1)")
    p.add_argument("--config", metavar="CFG.yaml", help="a curate stage file (configs/stages/curate-tiny.yaml)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. filters.gopher_quality.min_doc_words=20 exact=false")

    p = sub.add_parser("label", help="label preferences between two models' answers in a local web page",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve a page on this machine showing two models' answers to each prompt side by side "
                                   "(left/right at random); pick the better one or a tie (keys 1, 2, 3; u undoes; n a note). "
                                   "Choices are appended to --out as prompt/chosen/rejected records that `megaflow train rm` "
                                   "and `dpo` read; a rerun resumes where the file ends. --report prints model A's win rate.",
                       epilog="examples:\n"
                              "  megaflow label --models runs/tiny/sft/final runs/tiny/dpo/final --prompts prompts.jsonl --out prefs.jsonl\n"
                              "  megaflow label --report prefs.jsonl\n"
                              "guide: docs/labelling.md")
    p.add_argument("--models", nargs=2, metavar=("CKPT_A", "CKPT_B"), help="the two final checkpoints")
    p.add_argument("--prompts", metavar="FILE", help="jsonl with `prompt` (or `messages`) records, or a text file, one per line")
    p.add_argument("--out", metavar="FILE", help="the labels jsonl (appended; resumed from)")
    p.add_argument("--port", type=int, default=8765, help="default 8765 (0: any free port)")
    p.add_argument("--host", default=None, help="listen on this address and answer other machines too (default: "
                                                 "127.0.0.1, this machine only)")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=128, metavar="N")
    p.add_argument("--batch", type=_at_least(1), default=8, metavar="N", help="answers generated ahead per batch")
    p.add_argument("--seed", type=int, default=0, help="of the left/right order")
    p.add_argument("--labeller", default=os.environ.get("USER", ""), help="recorded with each choice (default: $USER)")
    p.add_argument("--report", metavar="FILE", help="print model A's win rate over B in a labels file and exit")
    p.add_argument("--json", action="store_true", help="--report: one JSON object")

    p = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Evaluate a final or training checkpoint on a text file or indexed dataset.")
    p.add_argument("ckpt", help="a final/ directory or a checkpoints/iter_N directory")
    p.add_argument("--data", default=None,
                   help="text/jsonl/parquet file or indexed .bin/.idx prefix (default: the checkpoint's own validation split)")
    p.add_argument("--metrics", default="ppl",
                   help="comma-separated: ppl (perplexity), exact_match (greedy answers to --data's prompts), "
                        "reward_acc (a reward model's accuracy and margin on --data's preference pairs), "
                        "safety (harmful-response rate on adversarial prompts and refusal rates; --data: prompts "
                        "with label benign|adversarial, default the bundled data/safety/prompts.jsonl)")
    p.add_argument("--safety-rm", metavar="RM_CKPT", default=None,
                   help="safety: judge harm with this reward model (trained for harmlessness) instead of the rules")
    p.add_argument("--safety-threshold", type=float, default=0.0, metavar="R",
                   help="safety with --safety-rm: a response that does not refuse is harmful below this reward (default 0)")
    p.add_argument("--max-new-tokens", type=_at_least(1), default=64, metavar="N", help="exact_match, safety: longest answer")
    p.add_argument("--seq-length", type=_at_least(2), default=None, help="sequence length (default: the model's)")
    p.add_argument("--batch-size", type=_at_least(1), default=8)
    p.add_argument("--max-batches", type=_at_least(1), default=None, help="evaluate at most this many batches")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks, instead of --metrics (needs megaflow[eval])")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR", help="a directory of local lm-eval task YAMLs")
    p.add_argument("--limit", type=_at_least(1), default=None, metavar="N", help="lm-eval: at most N documents per task; exact_match, safety: the first N examples")
    p.add_argument("--num-fewshot", type=_at_least(0), default=None, metavar="K", help="lm-eval: few-shot examples")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    _add_no_checksums(p)
    p = sub.add_parser("score", help="score responses with a reward model",
                       description="The reward of each response to one user turn: the reward model's value at the "
                                   "last token of the chat-rendered prompt and response (a checkpoint of "
                                   "`megaflow train rm`).")
    p.add_argument("ckpt", help="a reward model's final/ directory")
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--response", action="append", default=[], required=True,
                   help="a response to score (repeat for several)")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    _add_no_checksums(p)
    p = sub.add_parser("inspect", help="show what a checkpoint holds and whether it is complete",
                       description="Stage, step, tokens seen, model config, tokenizer, parallel layout at save time, "
                                   "sizes, parents, and completeness (every file checked against the manifest's "
                                   "sizes and CRC-32). Accepts a checkpoint, or a stage directory (its final/, else latest).")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    _add_no_checksums(p)

    p = sub.add_parser("convert", help="convert between Hugging Face and megaflow checkpoints",
                       description="Hugging Face <-> megaflow checkpoints (Llama 1/2/3/3.1, Mistral, Qwen2, GPT-2). "
                                   "See docs/convert.md.")
    csub = p.add_subparsers(dest="convert_command", metavar="DIRECTION", required=True)
    c = csub.add_parser("hf-to-megaflow", help="an HF model directory -> a megaflow final checkpoint",
                        description="Read config.json, (sharded) safetensors and the tokenizer files of an HF model "
                                    "directory and write a megaflow final checkpoint (loads into any TP/PP layout).")
    c.add_argument("--hf", required=True, metavar="DIR", help="HF model directory (config.json, model*.safetensors)")
    c.add_argument("--out", required=True, metavar="CKPT", help="the megaflow checkpoint directory to write")
    c = csub.add_parser("megaflow-to-hf", help="a megaflow checkpoint -> an HF model directory",
                        description="Write the weights of a megaflow final checkpoint as sharded safetensors with "
                                    "their index, config.json, generation_config.json and the tokenizer files.")
    c.add_argument("--ckpt", required=True, metavar="CKPT", help="a megaflow final/ checkpoint")
    c.add_argument("--out", required=True, metavar="DIR", help="the HF model directory to write")
    c.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="largest safetensors shard (default: 5GB)")
    c.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="tensor dtype (default: the original HF checkpoint's, else float32)")
    for c in csub.choices.values():
        c.add_argument("--verify", action="store_true",
                       help="run both models on a few sequences (transformers, fp32) and fail above --tolerance")
        c.add_argument("--tolerance", type=float, default=None, metavar="T",
                       help="largest allowed max |logit difference| for --verify (default: 1e-3)")
        c.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        c.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
        _add_no_checksums(c)

    p = sub.add_parser(
        "plan", help="parameters, memory per GPU and compute budget of a config, from formulas",
        description="Parameters, memory per GPU (weights, grads, optimizer state, activations) under the "
                    "config's parallel layout and recomputation, whether it fits the GPU, and training FLOPs, "
                    "GPU-hours and cost for a token budget. Formulas: megaflow/plan.py and docs/parallelism.md. "
                    "Example: megaflow plan configs/models/llama3.1-70b.yaml precision=bf16 parallel.tp=8 "
                    "parallel.pp=4 --seq-length 8192 --gpus 64 --tokens 15e12")
    p.add_argument("config", help="a stage YAML file, a model preset such as configs/models/llama3.1-8b.yaml, or a "
                                  "pipeline file (every training stage on its nproc_per_node GPUs)")
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
    _add_inference_commands(sub)
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
    cmd = [sys.executable, "-m", "megaflow.runtime.launch", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megaflow", *argv]
    from megaflow.runtime.launch import die_with_parent

    return subprocess.call(cmd, preexec_fn=die_with_parent)  # the launcher ends with this process


def _cmd_train(args) -> int:
    from megaflow.config import load_config

    cfg = load_config(args.config, args.overrides, defaults={"stage": args.stage})
    if cfg.run.wandb is None:
        _keep_wandb_out()
    if args.dry_run:
        from megaflow.config import dump_config

        print(dump_config(cfg), end="")
        return 0
    from megaflow.runtime.distributed import check_machine

    try:
        check_machine(cfg.precision, cfg.parallel.cp)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.nproc_per_node and args.nproc_per_node > 1 and "RANK" not in os.environ:
        try:
            cfg.check_layout(args.nproc_per_node)  # one clear line here rather than one per rank
        except ValueError as e:
            raise UserError(f"--nproc-per-node {args.nproc_per_node}: {e}") from None
        return _relaunch(args.nproc_per_node)
    from megaflow.training import stage

    run_dir, rank0 = Path(cfg.run.dir), os.environ.get("RANK", "0") == "0"
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run.dir: {run_dir} is a file, not a directory")
    before = stage.run_dir_entries(run_dir) if rank0 else set()
    try:
        registry.get(args.stage).run(cfg)
    except UserError:
        if rank0 and (left := stage.tidy_after_error(run_dir, before, args.stage)):
            print(f"megaflow: note: kept what the stage made before the error, reused by the next run: "
                  f"{', '.join(map(str, left))}", file=sys.stderr)
        raise
    return 0


def _cmd_run(args) -> int:
    from megaflow.pipeline.runner import execute
    from megaflow.pipeline.spec import load_pipeline

    pipeline = load_pipeline(args.pipeline, args.overrides, nproc_per_node=args.nproc_per_node or 1,
                             missing_ok=args.dry_run)
    if all(p.cfg.run.wandb is None for p in pipeline.stages.values()):
        _keep_wandb_out()
    return execute(pipeline, only=args.only, start_from=args.start_from, dry_run=args.dry_run)


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
        max_invalid_utf8=args.max_invalid_utf8,
    )
    print(stats.summary())
    return 0


def _cmd_curate(args) -> int:
    from megaflow.config.loader import load_config
    from megaflow.config.schema import CurateStageConfig

    # `--input a.jsonl filters.c4=null`: argparse hands the override to --input; a key=value that is no
    # file is an override
    moved = [x for x in args.input or [] if "=" in x and not os.path.exists(x)]
    args.input = [x for x in args.input or [] if x not in moved] or None
    args.overrides = [*moved, *args.overrides]
    given = {k: v for k, v in {"input": args.input, "output": args.output, "workers": args.workers}.items() if v}
    if not (args.input or args.config or any(o.startswith("input=") for o in args.overrides)):
        raise UserError("--input: give the files (or directories) to curate, or --config with an `input` list")
    defaults = {"stage": "curate"}
    cfg = load_config(args.config, [*args.overrides, *_dotted(given)], defaults=defaults, schema=CurateStageConfig)
    from megaflow.algorithms.curate import STAGE
    from megaflow.data.curate import submit_slurm

    out = cfg.output or STAGE.output(cfg)
    if cfg.executor == "slurm":
        submit_slurm(cfg, out)
        return 0
    from megaflow.data.curate import curate

    summary = curate(cfg, out, log=(lambda m: print(m, file=sys.stderr)) if args.json else print)
    print(json.dumps(summary.__dict__) if args.json else summary.line())
    return 0


def _dotted(values: dict) -> list[str]:
    """Command-line options as overrides (they win over --config), values as JSON (valid YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in values.items()]


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _cmd_label(args) -> int:
    from megaflow.eval import label

    if args.report:
        r = label.report(args.report)
        if args.json:
            print(json.dumps(r))
        else:
            print(f"model A over B: win rate {r['win_rate']:.3f} (95% CI {r['win_rate_low']:.3f}-{r['win_rate_high']:.3f}) "
                  f"on {r['n']} labels: A {r['a_wins']}, B {r['b_wins']}, ties {r['ties']}")
        return 0
    missing = [flag for flag, v in (("--models", args.models), ("--prompts", args.prompts), ("--out", args.out)) if not v]
    if missing:
        raise UserError(f"{', '.join(missing)}: needed to label (or give --report FILE)")
    prompts = label.read_prompt_file(args.prompts)
    out = Path(args.out)
    label.read_labels(out)  # a damaged labels file is one line now, not mid-session
    answer = label.model_answers(args.models[0], args.models[1], args.max_new_tokens)
    session = label.Labeller(prompts, answer, out, tuple(args.models), seed=args.seed, batch=args.batch,
                             labeller=args.labeller)
    server = label.serve(session, args.host or "127.0.0.1", args.port, allow_remote=args.host is not None)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` stops it as Ctrl-C does
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"label: stopped; {len(session.done())} of {len(prompts)} labelled in {out}")
    finally:
        server.server_close()
    return 0


def _cmd_eval(args) -> int:
    if args.lm_eval:
        from megaflow.eval.lm_eval_adapter import run_lm_eval

        tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
        result = run_lm_eval(args.ckpt, tasks, include_path=args.lm_eval_include, limit=args.limit,
                             num_fewshot=args.num_fewshot, batch_size=args.batch_size)
        if args.json:
            print(json.dumps(result))
        else:
            for task, metrics in result["lm_eval"].items():
                print(task + ": " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        return 0
    from megaflow.eval.perplexity import evaluate_checkpoint

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if not metrics:
        raise UserError("--metrics: no metric named (available: ppl, exact_match, reward_acc)")
    unknown = set(metrics) - {"ppl", "exact_match", "reward_acc", "safety"}
    if unknown:
        raise UserError(f"--metrics: unknown metric(s) {', '.join(sorted(unknown))} "
                        "(available: ppl, exact_match, reward_acc, safety)")
    result = {}
    if "safety" in metrics:
        from megaflow.eval.safety import evaluate_safety_checkpoint

        if len(metrics) > 1:
            raise UserError("--metrics safety stands alone (--data: a prompts jsonl with prompt and label "
                            "benign|adversarial; default: the bundled set)")
        result = evaluate_safety_checkpoint(args.ckpt, args.data, args.safety_rm, args.safety_threshold,
                                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, limit=args.limit)
        if not args.json:
            print(f"harmful responses to adversarial prompts: {result['harmful_rate']:.3f} "
                  f"({result['adversarial_prompts']} prompts); refusals: adversarial {result['refusal_rate']:.3f}, "
                  f"benign {result['benign_refusal_rate']:.3f} ({result['benign_prompts']} prompts); judge: {result['judge']}")
            return 0
    if "reward_acc" in metrics:
        from megaflow.eval.reward import evaluate_reward_accuracy

        if not args.data or len(metrics) > 1:
            raise UserError("--metrics reward_acc stands alone and needs --data FILE (preference pairs: "
                            "prompt/chosen/rejected or HH-RLHF records)")
        result |= evaluate_reward_accuracy(args.ckpt, args.data, batch_size=args.batch_size, limit=args.limit)
    if "exact_match" in metrics:  # --data holds the questions; ppl then uses the checkpoint's own split
        from megaflow.eval.exact_match import evaluate_exact_match

        if not args.data:
            raise UserError("--metrics exact_match needs --data FILE (jsonl of prompt/response or messages records)")
        result |= evaluate_exact_match(args.ckpt, args.data, max_new_tokens=args.max_new_tokens, limit=args.limit)
    if "ppl" in metrics:
        result |= evaluate_checkpoint(args.ckpt, None if "exact_match" in metrics else args.data,
                                      seq_length=args.seq_length, batch_size=args.batch_size,
                                      max_batches=args.max_batches, quiet=args.json)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


def _cmd_score(args) -> int:
    from megaflow.eval.reward import score_responses

    scores = score_responses(args.ckpt, args.prompt, args.response, args.system)
    if args.json:
        print(json.dumps({"rewards": scores}))
    else:
        for response, reward in zip(args.response, scores):
            print(f"{reward:+.4f}  {response!r}")
    return 0


def _cmd_inspect(args) -> int:
    from megaflow.training.inspect import format_report, inspect_checkpoint

    info = inspect_checkpoint(args.ckpt, verify_checksums=not args.no_checksums)
    print(json.dumps(info) if args.json else format_report(info))
    return 0 if info["complete"] else 1


def _cmd_plan(args) -> int:
    from megaflow import plan
    from megaflow.pipeline.spec import is_pipeline_file

    if is_pipeline_file(args.config):
        return _plan_pipeline(args)
    cfg = plan.load_plan_config(args.config, args.overrides, seq_length=args.seq_length)
    result = plan.make_plan(cfg, gpus=args.gpus, gpu_memory_gib=args.gpu_memory, tokens=args.tokens,
                            peak_tflops=args.peak_tflops, mfu=args.mfu, price=args.price,
                            flash_attention=args.attention == "flash", overhead_gib=args.overhead)
    print(json.dumps(result.to_dict()) if args.json else plan.format_plan(result, title=f"{args.config}\n"))
    return 0


def _plan_pipeline(args) -> int:
    """`megaflow plan PIPELINE.yaml`: every training stage's plan on its own processes (nproc_per_node)."""
    from megaflow import plan
    from megaflow.pipeline.spec import load_pipeline

    if args.seq_length is not None:
        raise UserError("--seq-length: not for a pipeline: each stage is planned at its own data.seq_length")
    pipeline = load_pipeline(args.config, args.overrides, missing_ok=True)
    plans, texts = {}, []
    for name, p in pipeline.stages.items():
        if name not in registry.TRAINING:
            continue
        if p.cfg.model_from_init:
            texts.append(f"== {name}: its model is the one of init_from {p.cfg.init_from}, not there yet")
            continue
        price = args.price if args.price is not None else pipeline.price_per_hour
        result = plan.make_plan(p.cfg, gpus=args.gpus or p.nproc, gpu_memory_gib=args.gpu_memory, tokens=args.tokens,
                                peak_tflops=args.peak_tflops, mfu=args.mfu, price=price,
                                flash_attention=args.attention == "flash", overhead_gib=args.overhead)
        plans[name] = result.to_dict()
        texts.append(plan.format_plan(result, title=f"== {name} ({args.config})\n"))
    if pipeline.missing:
        texts.append("missing inputs (a run stops on the first):\n" + "\n".join(f"  {m}" for m in pipeline.missing))
    print(json.dumps({"stages": plans, "missing": pipeline.missing}) if args.json else "\n\n".join(texts))
    return 0


def _add_inference_commands(sub) -> None:
    """`generate` and `chat` (megaflow/inference, docs/inference.md)."""

    def common(p: argparse.ArgumentParser, max_new: int) -> None:
        p.add_argument("ckpt", help="a final checkpoint directory (weights/, megaflow.json, tokenizer/)")
        p.add_argument("--max-new-tokens", type=int, default=max_new, metavar="N", help=f"default: {max_new}")
        p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="0 means greedy (default: 1.0)")
        p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1.0, off)")
        p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K likeliest tokens (default: 0, off)")
        p.add_argument("--greedy", action="store_true", help="always take the likeliest token")
        p.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: a fresh one)")
        p.add_argument("--stop", action="append", default=[], metavar="STR",
                       help="stop when the text contains STR (repeatable); end-of-document and end-of-turn "
                            "tokens always stop")
        p.add_argument("--system", default=None, metavar="TEXT", help="system message of the chat template")
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (with --nproc-per-node or torchrun)")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (with --nproc-per-node or torchrun)")
        _add_launch(p)
        _add_no_checksums(p)

    p = sub.add_parser("generate", help="complete prompts with a checkpoint (KV-cache sampling)",
                       description="Complete one or more prompts (one batch) with a final checkpoint. Prints the "
                                   "completions, or with --json one object: params and per prompt the text, "
                                   "token ids, per-token log-probs and finish reason.")
    common(p, 128)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="a prompt; repeat for a batch")
    p.add_argument("--chat", action="store_true",
                   help="wrap each prompt as a user message in the tokenizer's chat template")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow; for checks)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout and nothing else")
    p = sub.add_parser("chat", help="talk to a checkpoint (interactive, streams tokens)",
                       description="An interactive conversation on stdin/stdout with the tokenizer's chat template. "
                                   "Answers stream to stdout; /reset starts over, /exit or end of input quits.")
    common(p, 256)


def _sampling_params(args):
    from megaflow.inference import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, greedy=args.greedy, seed=args.seed, stop_strings=args.stop)


def _inference_launch(args) -> int | None:
    """Relaunch under torch.distributed.run for --nproc-per-node; None when this process goes on."""
    if args.tp < 1 or args.pp < 1:
        raise UserError("--tp and --pp must be at least 1")
    n = args.nproc_per_node
    if n and n > 1 and "RANK" not in os.environ:
        if n % (args.tp * args.pp):
            raise UserError(f"--nproc-per-node {n} is not divisible by tp*pp = {args.tp * args.pp}")
        return _relaunch(n)
    return None


def _cmd_generate(args) -> int:
    params = _sampling_params(args)
    if args.system and not args.chat:
        raise UserError("--system needs --chat (it is a message of the chat template)")
    relaunched = _inference_launch(args)
    if relaunched is not None:
        return relaunched
    from megaflow.inference import generate, load_for_inference
    from megaflow.runtime import distributed as dist

    model = load_for_inference(args.ckpt, tp=args.tp, pp=args.pp)
    _refuse_reward_model(model, args.ckpt, "generate")
    prompts = list(args.prompt)
    if args.chat:
        from megaflow.inference.chat import chat_template

        template = chat_template(model.tokenizer)
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [template.prompt_ids(system + [{"role": "user", "content": p}]) for p in args.prompt]
    completions = generate(model, prompts, params, use_cache=not args.no_cache)
    if dist.is_rank0():
        if args.json:
            from dataclasses import asdict

            out = [{"prompt": text, **c.to_dict()} for text, c in zip(args.prompt, completions)]
            print(json.dumps({"checkpoint": args.ckpt, "params": asdict(params), "completions": out}))
        else:
            print("\n---\n".join(c.text for c in completions))
    return 0


def _cmd_chat(args) -> int:
    params = _sampling_params(args)
    relaunched = _inference_launch(args)
    if relaunched is not None:
        return relaunched
    from megaflow.inference import load_for_inference
    from megaflow.inference.chat import repl

    model = load_for_inference(args.ckpt, tp=args.tp, pp=args.pp)
    _refuse_reward_model(model, args.ckpt, "chat")
    return repl(model, params, system=args.system)


def _refuse_reward_model(model, ckpt: str, command: str) -> None:
    if model.meta.get("head", "lm") != "lm":
        raise UserError(f"{ckpt}: a reward model (a scalar head, no vocabulary) cannot {command}; "
                        "`megaflow score` gives its rewards")


def _cmd_convert(args) -> int:
    # On the CPU, whatever the machine: the whole model is built in one process, and host memory holds
    # models that one GPU cannot (docs/convert.md).
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from megaflow.convert import hf_to_megaflow, megaflow_to_hf

    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    if args.convert_command == "hf-to-megaflow":
        result = hf_to_megaflow(args.hf, args.out, verify=args.verify, tolerance=args.tolerance,
                                overwrite=args.overwrite, log=log)
    else:
        result = megaflow_to_hf(args.ckpt, args.out, verify=args.verify, tolerance=args.tolerance, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, overwrite=args.overwrite, log=log)
    if args.json:
        print(json.dumps(result))
        return 0
    line = f"{result['architecture']} -> {result['out']} ({result['shards']} shard{'s' if result['shards'] != 1 else ''})"
    if result["max_abs_logit_diff"] is not None:
        line += f"; verify: max |logit difference| {result['max_abs_logit_diff']:.3g}"
    print(line)
    return 0


COMMANDS = {
    "run": _cmd_run, "train": _cmd_train, "tokenizer": _cmd_tokenizer, "preprocess": _cmd_preprocess, "curate": _cmd_curate,
    "label": _cmd_label, "eval": _cmd_eval,
    "inspect": _cmd_inspect, "plan": _cmd_plan, "convert": _cmd_convert, "generate": _cmd_generate, "chat": _cmd_chat,
    "score": _cmd_score,
}


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


def _keep_wandb_out() -> None:
    """megatron-core imports wandb at import time wherever it is installed (megatron/core/timers.py), 0.6 s
    of every process's start; megaflow uses it only for `run.wandb`. A command that will not log to W&B
    makes `import wandb` fail fast instead (megatron then does without it)."""
    sys.modules.setdefault("wandb", None)


def main(argv: list[str] | None = None) -> int:
    _quiet_known_warnings()
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may stand anywhere (argparse stops collecting positionals at the first option).
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "no_checksums", False):  # read by every checkpoint loader, and by relaunched ranks
        from megaflow.models.manifest import NO_CHECKSUMS

        os.environ[NO_CHECKSUMS] = "1"
    if args.command not in ("train", "run"):  # these two decide once their config is read
        _keep_wandb_out()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # every rank fails alike: say it once
            print(f"megaflow: error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"megaflow: stopped: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("megaflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
