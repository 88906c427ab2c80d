"""Documents/s of `megaflow curate` against the same datatrove steps run directly (datatrove's own reader,
writer and executors, no megaflow), side by side on the same corpus, filters and dedup settings.

The input is split into one shard per worker first. Both sides run: Gopher repetition and FineWeb line filters, exact dedup, MinHash LSH (5-grams, 20 bands,
threshold 0.8), in datatrove's LocalPipelineExecutor with --workers processes; megaflow adds its input
validation pass, the removed-examples writer, the summary and the atomic rename. The two outputs must hold
the same documents (checked). Each side runs in a fresh process, --rounds times, interleaved; medians.

    python tools/bench_curate.py [--input data/sample/curate-raw/train.jsonl.gz] [--workers 2] [--rounds 3]
JSON: --out (default bench-results/bench_curate.json, or $OUT/bench_curate.json when $OUT is a folder).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench_common as common  # noqa: E402

REPO = common.REPO_ROOT
OVERRIDES = ["filters.length=null", "filters.language=null", "filters.gopher_quality=null", "filters.c4=null",
             "filters.gopher_repetition={top_n_grams: []}", "filters.fineweb={short_line_thr: 1.01}",
             "minhash.bands=20", "minhash.threshold=0.8", "examples=5"]


def run_direct(inp: str, out: str, workers: int) -> None:
    """The same steps with datatrove's JsonlReader/JsonlWriter and executors only."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    work = Path(out) / "work"
    hashing = HashConfig(precision=64, hash_fc="sha1")
    exact = ExactDedupConfig(content_getter=_normalized, hash_config=hashing)
    mh = MinhashConfig(n_grams=5, num_buckets=20, hashes_per_bucket=13, hash_config=hashing)

    def reader(folder, pattern=None):
        return JsonlReader(str(folder), glob_pattern=pattern, text_key="text")

    def writer(folder):
        return JsonlWriter(str(folder), output_filename="${rank}.jsonl.gz", compression="gzip")

    stages = [
        ([reader(inp, "*.jsonl.gz"), GopherRepetitionFilter(top_n_grams=()),
          FineWebQualityFilter(short_line_thr=1.01), writer(work / "filtered"), ExactDedupSignature(str(work / "sigs"), exact)], workers),
        ([ExactFindDedups(str(work / "sigs"), str(work / "dups"), exact)], 1),
        ([reader(work / "filtered"), ExactDedupFilter(str(work / "dups"), exact), writer(work / "exact"),
          MinhashDedupSignature(str(work / "mh_sigs"), mh)], workers),
        ([MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=mh)], 20),
        ([MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=mh)], 1),
        ([reader(work / "exact"), MinhashDedupFilter(str(work / "mh_remove")), writer(out)], workers),
    ]
    for i, (pipeline, tasks) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(work / f"logs{i}"),
                              skip_completed=False, start_method="spawn").run()


def _normalized(doc) -> str:
    return " ".join(doc.text.lower().split())


def count_docs(folder: Path) -> int:
    return sum(1 for shard in folder.glob("*.jsonl.gz") for _ in gzip.open(shard, "rt"))


def timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n# rc={proc.returncode} {dt:.1f}s\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr[-20000:]}")
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1:4]} failed; log {log}")
    return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(REPO / "data" / "sample" / "curate-raw" / "train.jsonl.gz"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    p.add_argument("--direct", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.direct:
        run_direct(a.direct[0], a.direct[1], a.workers)
        return 0
    out_path, log_dir = common.result_paths(a.out, "bench_curate")
    n_in = sum(1 for _ in gzip.open(a.input, "rt"))
    times: dict[str, list[float]] = {"megaflow": [], "datatrove": []}
    kept = {}
    with tempfile.TemporaryDirectory(prefix="bench_curate-") as tmp:
        shards = Path(tmp) / "input"  # one input shard per worker, so both sides split the work alike
        shards.mkdir()
        files = [gzip.open(shards / f"{i:05d}.jsonl.gz", "wt") for i in range(a.workers)]
        for i, line in enumerate(gzip.open(a.input, "rt")):
            files[i % a.workers].write(line)
        for f in files:
            f.close()
        for rnd in range(a.rounds):
            for impl in times:
                out = Path(tmp) / f"{impl}-{rnd}"
                cmd = ([sys.executable, "-m", "megaflow", "curate", "--input", str(shards), "--output", str(out),
                        f"workers={a.workers}", *OVERRIDES] if impl == "megaflow" else
                       [sys.executable, str(Path(__file__).resolve()), "--workers", str(a.workers), "--direct", str(shards), str(out)])
                times[impl].append(timed(cmd, log_dir / f"{impl}-{rnd}.log"))
                kept[impl] = count_docs(out)
    if kept["megaflow"] != kept["datatrove"]:
        raise SystemExit(f"the outputs differ: megaflow kept {kept['megaflow']} documents, datatrove {kept['datatrove']}")
    speed = {impl: n_in / common.median(t) for impl, t in times.items()}
    ratio = speed["megaflow"] / speed["datatrove"]
    print(common.format_table(["impl", "documents/s (median)", "s (median)", "runs"],
                              [[impl, f"{speed[impl]:.0f}", f"{common.median(times[impl]):.1f}", str(len(times[impl]))]
                               for impl in times]))
    print(f"megaflow curate / datatrove's steps directly: {ratio:.2f}x ({n_in} documents in, {kept['megaflow']} kept, "
          f"{a.workers} workers)")
    record = {"benchmark": "bench_curate", "date": common.now_iso(), "input": a.input, "documents": n_in,
              "kept": kept["megaflow"], "workers": a.workers, "seconds": times, "docs_per_s": speed, "ratio": ratio,
              "env": common.env_info()}
    out_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
