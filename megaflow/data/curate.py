"""Pretraining data curation on HF datatrove: quality filters, exact and MinHash near-deduplication.

Why datatrove: it holds FineWeb's own steps (the Gopher quality and repetition rules, C4's, FineWeb's
line-level filters, exact dedup, four-step MinHash LSH), each a pipeline step over a document stream that
runs the same under a local process pool and under SLURM (its executors). megaflow adds what datatrove
leaves to its users: reading megaflow's inputs with file:line errors, a language filter whose model ships
with its package (py3langid; datatrove's downloads fastText's), a length filter, a cap on the examples
kept per removal reason, and one summary.

The run is a sequence of executor stages (each reads what the one before wrote under `work/`):

    1  read -> length, language, gopher_repetition, gopher_quality, c4, fineweb -> filtered/  (+ exact sigs)
    2  exact duplicates: the signatures sorted and merged (one task)
    3  filtered/ -> drop exact duplicates -> exact/  (+ MinHash signatures)
    4  MinHash buckets (one task per band)     5  clusters (one task)
    6  exact/ -> drop near duplicates -> the output shards, 00000.jsonl.gz ...

A stage's task r reads only the shard its own rank wrote before, so document indices (which the dedup
steps use) line up. Exact duplicates are texts equal after lowercasing and collapsing whitespace;
near duplicates are pairs whose word n-gram sets collide in at least one LSH band, which a pair of
Jaccard similarity s does with probability 1 - (1 - s^rows)^bands (`lsh_probability`). Of each
duplicate cluster the first document is kept.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from megaflow.config.schema import CurateFilters, CurateStageConfig
from megaflow.data.readers import expand_inputs
from megaflow.errors import DataError, UserError

FILTERS = tuple(CurateFilters.model_fields)  # in the order they run: cheap ones first


# --- the math --------------------------------------------------------------------------------------


def lsh_probability(similarity: float, bands: int, rows: int) -> float:
    """P(a pair of Jaccard similarity s shares a band) = 1 - (1 - s^rows)^bands."""
    return 1.0 - (1.0 - similarity**rows) ** bands


# --- checks ------------------------------------------------------------------------------------------


def check_settings(s: CurateStageConfig) -> None:
    """Every option named right and every input readable, before anything is written (one line each)."""
    import importlib.util
    import inspect

    missing = [m for m in ("datatrove", "spacy", "py3langid", "orjson") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"curation needs {', '.join(missing)}: pip install 'megaflow[curate]'")
    for name in FILTERS:
        kwargs = getattr(s.filters, name)
        if kwargs is None:
            continue
        allowed = set(inspect.signature(_filter_class(name).__init__).parameters) - {"self", "exclusion_writer"}
        for key in kwargs:
            if key not in allowed:
                raise UserError(f"filters.{name}.{key}: unknown option; {name} takes {', '.join(sorted(allowed))}")
    if s.minhash is not None:
        bands, rows = s.minhash.bands, s.minhash.rows_per_band()
        if bands * rows > 4096:
            raise UserError(f"minhash: {bands} bands x {rows} rows = {bands * rows} hashes per document; keep it under 4096")
    if s.tokenizer is not None and not Path(s.tokenizer).exists():
        raise UserError(f"tokenizer: not found: {s.tokenizer}")
    if s.executor == "slurm" and not s.slurm.partition:
        raise UserError("slurm.partition: the SLURM executor needs a partition")
    inputs = expand_inputs(s.input)
    if not inputs:
        raise UserError("--input: no input files")
    for p in inputs:
        if not os.path.isfile(p):
            raise DataError(f"{p}: file not found")
        if not os.access(p, os.R_OK):
            raise DataError(f"{p}: not readable")


def validate_inputs(s: CurateStageConfig) -> tuple[int, int]:
    """Read every input once with megaflow's readers (a bad line is a DataError naming file:line); the
    number of documents and (with `tokenizer`) of tokens. Runs before any output exists, so bad input
    leaves nothing half-written."""
    import zlib

    from megaflow.data.readers import iter_documents

    count = _token_counter(s)
    n = tokens = 0
    for p in expand_inputs(s.input):
        try:
            for text in iter_documents(p, field=s.field, split_documents_on=s.split_documents_on):
                n += 1
                tokens += count(text)
        except (OSError, EOFError, zlib.error) as e:  # a damaged .gz, an unreadable parquet
            raise DataError(f"{p}: cannot read ({type(e).__name__}: {e})") from None
    if n == 0:
        raise DataError(f"{', '.join(s.input)}: no documents (empty input)")
    return n, tokens


def _token_counter(s: CurateStageConfig):
    """len(tokenizer.encode(text)) with the configured tokenizer, or 0 without one."""
    if s.tokenizer is None:
        return lambda text: 0
    from megaflow.data.tokenizer import Tokenizer

    tok = Tokenizer.load(s.tokenizer)
    return lambda text: len(tok.encode(text))


# --- datatrove steps ---------------------------------------------------------------------------------


def _filter_class(name: str):
    from megaflow.data.curate_steps import FILTER_CLASSES

    return FILTER_CLASSES[name]


def stages(s: CurateStageConfig, work: Path, out: Path) -> list[tuple[str, list, int]]:
    """(name, pipeline steps, tasks) of every executor stage, in order (see the module docstring)."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from megaflow.data import curate_steps as steps

    tasks = s.workers if s.executor == "local" else s.slurm.tasks
    hashing = HashConfig(precision=64, hash_fc="sha1")  # datatrove 0.10's xxhash path wants xxhash < 4
    examples = work / "examples"

    def writer(folder: Path):
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz", compression="gzip")

    def sample(name: str):
        return steps.SampleWriter(str(examples / name), s.examples)

    filters = []
    for name in FILTERS:
        if (kwargs := getattr(s.filters, name)) is not None:
            step = _filter_class(name)(**kwargs, exclusion_writer=sample(name), **_language_kwarg(name, s))
            step.megaflow_name = name  # what the summary calls its removals
            filters.append(step)
    exact_cfg = ExactDedupConfig(content_getter=steps.normalized_text, hash_config=hashing)
    first = [steps.MegaflowReader(expand_inputs(s.input), s.field, s.split_documents_on), *filters]
    plan: list[tuple[str, list, int]] = []
    if s.exact:
        plan.append(("read and filter", first + [writer(work / "filtered"),
                                                 ExactDedupSignature(str(work / "exact_sigs"), exact_cfg)], tasks))
        plan.append(("exact duplicates", [ExactFindDedups(str(work / "exact_sigs"), str(work / "exact_dups"), exact_cfg)], 1))
        source = steps.RankReader(str(work / "filtered"))
        second = [source, ExactDedupFilter(str(work / "exact_dups"), exact_cfg, exclusion_writer=sample("exact_duplicate"))]
    else:
        second = first
    if s.minhash is None:
        plan.append(("write", second + [writer(out)], tasks))
        return plan
    bands, rows = s.minhash.bands, s.minhash.rows_per_band()
    mh = MinhashConfig(n_grams=s.minhash.n_grams, num_buckets=bands, hashes_per_bucket=rows, seed=s.minhash.seed,
                       hash_config=hashing)
    plan.append(("minhash signatures", second + [writer(work / "exact"),
                                                 MinhashDedupSignature(str(work / "mh_sigs"), mh, language=s.language)], tasks))
    plan.append(("minhash buckets", [MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=mh)], bands))
    plan.append(("minhash clusters", [MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=mh)], 1))
    plan.append(("write", [steps.RankReader(str(work / "exact")),
                           MinhashDedupFilter(str(work / "mh_remove"), exclusion_writer=sample("near_duplicate")),
                           writer(out)], tasks))
    return plan


def _language_kwarg(name: str, s: CurateStageConfig) -> dict:
    """datatrove's filters take the language of their word tokenizer; megaflow's own two do not."""
    import inspect

    return {"language": s.language} if "language" in inspect.signature(_filter_class(name).__init__).parameters else {}


# --- running -----------------------------------------------------------------------------------------


@dataclass
class CurateSummary:
    documents_in: int = 0
    documents_out: int = 0
    words_in: int = 0
    words_out: int = 0
    tokens_in: int = 0  # with `tokenizer` set, else 0
    tokens_out: int = 0
    removed: dict[str, int] = field(default_factory=dict)  # filter name or duplicate kind -> documents
    reasons: dict[str, int] = field(default_factory=dict)  # filter name/reason -> documents
    exact_duplicates: int = 0
    near_duplicates: int = 0
    minhash: dict = field(default_factory=dict)  # bands, rows, threshold, P(candidate) at a few similarities
    shards: list[str] = field(default_factory=list)
    examples: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        kept = self.documents_out / max(self.documents_in, 1)
        removed = ", ".join(f"{k} {v}" for k, v in self.removed.items() if v)
        tokens = (f", {self.tokens_in:,} -> {self.tokens_out:,} tokens" if self.tokens_in else "")
        return (f"curated {self.documents_in:,} documents ({self.words_in:,} words) -> {self.documents_out:,} "
                f"({self.words_out:,} words, {kept:.1%} kept{tokens}) in {self.seconds:.1f}s; removed: {removed or 'none'}")


def curate(s: CurateStageConfig, output: str | Path, log=print) -> CurateSummary:
    """Run every stage; the output directory appears complete (shards, summary.json, examples.jsonl) or
    not at all: the work happens in OUTPUT.tmp-PID and is renamed into place at the end."""
    check_settings(s)
    if s.executor == "slurm":
        raise UserError("executor: slurm submits jobs (megaflow.data.curate.submit_slurm); curate() runs locally")
    started = time.perf_counter()
    out = Path(output)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    work = tmp / "work"
    try:
        n_docs, n_tokens = validate_inputs(s)
        summary = CurateSummary(documents_in=n_docs, tokens_in=n_tokens)
        plan = stages(s, work, tmp)
        for i, (name, pipeline, tasks) in enumerate(plan, 1):
            t0 = time.perf_counter()
            _execute(s, name, pipeline, tasks, work / "logs" / f"{i - 1}-{name.replace(' ', '-')}")
            log(f"curate [{i}/{len(plan)}] {name}: {tasks} task(s), {time.perf_counter() - t0:.1f}s")
        _summarize(s, plan, work, tmp, summary)
        summary.seconds = time.perf_counter() - started
        (tmp / "summary.json").write_text(json.dumps(summary.__dict__, indent=2) + "\n")
        shutil.rmtree(work)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary.shards = [str(out / Path(p).name) for p in summary.shards]
    summary.examples = str(out / "examples.jsonl")
    return summary


def submit_slurm(s: CurateStageConfig, output: str | Path, log=print) -> list[str]:
    """Submit every stage as a SLURM job array, each depending on the one before (datatrove's
    SlurmPipelineExecutor, which calls sbatch); returns the job names. The jobs write OUTPUT/*.jsonl.gz
    in place, and datatrove's logs and stats to OUTPUT/work/logs."""
    from datatrove.executor import SlurmPipelineExecutor

    check_settings(s)
    validate_inputs(s)
    out = Path(output)
    work = out / "work"
    previous, names = None, []
    opts = s.slurm.model_dump(exclude={"tasks", "venv_path", "sbatch_args"})
    for i, (name, pipeline, tasks) in enumerate(stages(s, work, out)):
        job = f"curate-{i}-{name.replace(' ', '-')}"
        previous = SlurmPipelineExecutor(pipeline=pipeline, tasks=tasks, logging_dir=str(work / "logs" / job), job_name=job,
                                         depends=previous, venv_path=s.slurm.venv_path, sbatch_args=s.slurm.sbatch_args or None,
                                         slurm_logs_folder=str(work / "slurm_logs"), **opts)
        names.append(job)
    previous.run()  # launches its dependencies first
    log(f"curate: submitted {len(names)} SLURM job arrays ({', '.join(names)}); shards -> {out}, logs -> {work / 'logs'}")
    return names


def _execute(s: CurateStageConfig, name: str, pipeline: list, tasks: int, logs: Path) -> None:
    from datatrove.executor import LocalPipelineExecutor

    executor = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(s.workers, tasks),
                                     logging_dir=str(logs), skip_completed=False, start_method="spawn")
    logs.mkdir(parents=True, exist_ok=True)
    with _stderr_to(logs / "stderr.log"):  # datatrove logs every task at INFO to stderr; its log files keep it all
        try:
            executor.run()
        except Exception as e:
            raise UserError(f"curate: the {name} step failed ({type(e).__name__}: {e}); logs in {logs}") from None


@contextlib.contextmanager
def _stderr_to(path: Path):
    """File descriptor 2 into `path` for a while (worker processes inherit it), restored after."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _summarize(s: CurateStageConfig, plan, work: Path, out: Path, summary: CurateSummary) -> None:
    """Counts from datatrove's merged stats.json of each stage (one entry per step, in pipeline order),
    the output shards, and the examples."""
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupFilter
    from datatrove.pipeline.dedup.minhash import MinhashDedupFilter

    from megaflow.data.curate_steps import MegaflowReader

    for i, (name, pipeline, _) in enumerate(plan):
        stats_file = work / "logs" / f"{i}-{name.replace(' ', '-')}" / "stats.json"
        for step, entry in zip(pipeline, json.loads(stats_file.read_text()) if stats_file.exists() else []):
            stats = entry.get("stats", {})
            if isinstance(step, MegaflowReader):
                summary.words_in += _count(stats, "words")
            elif isinstance(step, ExactDedupFilter):
                summary.exact_duplicates += _count(stats, "dropped")
            elif isinstance(step, MinhashDedupFilter):
                summary.near_duplicates += _count(stats, "dropped")
            elif hasattr(step, "megaflow_name"):
                summary.removed[step.megaflow_name] = _count(stats, "dropped")
                for k in stats:
                    if k.startswith("dropped_"):
                        summary.reasons[f"{step.megaflow_name}/{k[8:]}"] = _count(stats, k)
    if s.exact:
        summary.removed["exact_duplicate"] = summary.exact_duplicates
    if s.minhash is not None:
        summary.removed["near_duplicate"] = summary.near_duplicates
    summary.shards = sorted(p.name for p in out.glob("*.jsonl.gz"))
    summary.documents_out, summary.words_out = 0, 0
    count = _token_counter(s)
    for rec in iter_output(out):
        summary.documents_out += 1
        summary.words_out += len(rec["text"].split())
        summary.tokens_out += count(rec["text"])
    if s.minhash is not None:
        bands, rows = s.minhash.bands, s.minhash.rows_per_band()
        summary.minhash = {"bands": bands, "rows": rows, "n_grams": s.minhash.n_grams,
                           "threshold": round((1.0 / bands) ** (1.0 / rows), 4),
                           "p_candidate": {str(x): round(lsh_probability(x, bands, rows), 4) for x in (0.5, 0.7, 0.8, 0.9, 0.95)}}
    with open(out / "examples.jsonl", "w", encoding="utf-8") as f:
        for folder in sorted((work / "examples").glob("*")):
            for rec in iter_output(folder):
                f.write(json.dumps({"removed_by": folder.name, "reason": rec.get("metadata", {}).get("filter_reason"),
                                    "id": rec.get("id"), "text": rec["text"]}) + "\n")


def _count(stats: dict, key: str) -> int:
    v = stats.get(key, 0)
    return int(v["total"] if isinstance(v, dict) else v)


def iter_output(directory: str | Path) -> Iterator[dict[str, Any]]:
    """The curated records of an output directory, shard by shard."""
    for shard in sorted(Path(directory).glob("*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)
