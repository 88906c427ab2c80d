"""Does curation pay? The same pretraining token budget on the raw corpus and on its curated version,
perplexity on a clean held-out text that neither saw (docs/curation.md records the result).

    python tools/curation_pays.py [--steps 220] [--out bench-results/curation_pays.json]

1. the raw corpus: data/sample/curate-raw (tools/make_curation_data.py: the sample's speeches but every
   10th, plus exact and near duplicates and junk), and its clean held-out speeches (heldout.txt);
2. `megaflow curate --config configs/stages/curate-tiny.yaml` on it;
3. one tokenizer for both, trained on the bundled sample text;
4. `megaflow train pretrain --config configs/stages/pretrain-tiny.yaml` twice, on the raw file and on the
   curated shards, with the same steps, batch and sequence length (the same tokens seen);
5. `megaflow eval --data heldout.txt --json` of both final checkpoints: perplexity per token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAW = REPO / "data" / "sample" / "curate-raw"


def megaflow(*args: str, log: Path) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "megaflow", *args], cwd=REPO, capture_output=True, text=True,
                          env={"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", **dict(__import__("os").environ)})
    log.write_text(f"$ megaflow {' '.join(args)}\n# rc={proc.returncode} {time.perf_counter() - t0:.0f}s\n"
                   f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        raise SystemExit(f"megaflow {args[0]} failed: {proc.stderr.strip().splitlines()[-1:]}; log {log}")
    return proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=220, help="pretraining steps of each run (16 x 256 tokens each)")
    p.add_argument("--out", default=str(REPO / "bench-results" / "curation_pays.json"))
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="curation-pays-") as tmp_name:
        tmp = Path(tmp_name)
        curated = tmp / "curated"
        summary = json.loads(megaflow("curate", "--config", "configs/stages/curate-tiny.yaml", "--input",
                                      str(RAW / "train.jsonl.gz"), "--output", str(curated), "--json", log=tmp / "curate.log"))
        print(f"curated: {summary['documents_in']} -> {summary['documents_out']} documents, "
              f"{summary['words_in']} -> {summary['words_out']} words")
        megaflow("tokenizer", "train", "--input", "data/sample/tinyshakespeare.txt", "--vocab-size", "4096",
                 "--output", str(tmp / "tokenizer"), log=tmp / "tokenizer.log")
        rows = {}
        for name, data in (("raw", RAW / "train.jsonl.gz"), ("curated", curated)):
            run = tmp / name
            megaflow("train", "pretrain", "--config", "configs/stages/pretrain-tiny.yaml", f"run.dir={run}",
                     f"tokenizer.path={tmp / 'tokenizer'}", "tokenizer.train_if_missing=null",
                     f"data.train=[{{path: {data}}}]", f"train.steps={a.steps}", "eval.every=0", "checkpoint.every=0",
                     "run.progress=false", log=tmp / f"pretrain-{name}.log")
            got = json.loads(megaflow("eval", str(run / "pretrain" / "final"), "--data", str(RAW / "heldout.txt"),
                                      "--json", log=tmp / f"eval-{name}.log"))
            rows[name] = {"heldout_ppl": got["ppl"], "train_loss": _last_loss(run / "pretrain" / "metrics.jsonl")}
            print(f"{name}: held-out perplexity {got['ppl']:.2f}")
    ratio = rows["curated"]["heldout_ppl"] / rows["raw"]["heldout_ppl"]
    tokens = a.steps * 16 * 256
    print(f"the same {tokens:,} training tokens: held-out perplexity raw {rows['raw']['heldout_ppl']:.2f}, curated "
          f"{rows['curated']['heldout_ppl']:.2f} ({ratio:.3f}x)")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": a.steps, "tokens": tokens, "runs": rows, "curated_over_raw": ratio,
                               "curate": {k: summary[k] for k in ("documents_in", "documents_out", "words_in", "words_out",
                                                                  "removed")}}, indent=2) + "\n")
    print(f"-> {out}")
    return 0


def _last_loss(metrics: Path) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if '"split"' not in line]
    return rows[-1]["loss"]


if __name__ == "__main__":
    sys.exit(main())
