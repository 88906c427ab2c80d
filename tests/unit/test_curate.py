"""Curation (megaflow.data.curate on datatrove): planted duplicates are found and near-misses kept, each
quality filter removes its planted bad document and keeps a good one, outputs are deterministic, and bad
input is one line naming the file (and line) with nothing written."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from megaflow.config.schema import CurateStageConfig
from megaflow.data.curate import curate, iter_output, lsh_probability
from tests.conftest import REPO, run_megaflow

NO_FILTERS = {name: None for name in ("length", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb")}
GOOD = ("The river runs past the old mill and into the valley below the town.\n"
        "Every spring the farmers open the gates so that the water can reach their fields.\n"
        "In the summer the children swim in the deep pools near the stone bridge.\n"
        "By autumn the leaves have turned and the water is cold and clear again.\n"
        "The miller says that the river has never once run dry in all of his years.\n"
        "People from the city come to walk along its banks on quiet Sunday afternoons.\n"
        "Some of them bring bread for the ducks that gather under the willow trees.\n"
        "When the winter comes the whole valley is still, and the mill wheel stops.\n")


def _config(tmp: Path, inputs: list[Path], **kw) -> CurateStageConfig:
    return CurateStageConfig.model_validate({"input": [str(p) for p in inputs], "run": {"dir": str(tmp / "run")}} | kw)


def _write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = text.lower().split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def _edit(words: list[str], k: int, vocab: list[str], rng: random.Random) -> str:
    """`words` with k of them, spread evenly, replaced by other vocabulary words."""
    out = list(words)
    for i in range(k):
        j = (i * len(words)) // k + len(words) // (2 * k)
        out[j] = rng.choice([w for w in vocab[:50] if w != out[j]])
    return " ".join(out)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """150 documents of 300 random words; then 30 exact copies (case and spacing changed), 30 near
    duplicates (3 words changed: Jaccard >= 0.9) and 30 near-misses (22 words changed: Jaccard <= 0.5)."""
    rng = random.Random(0)
    vocab = sorted({w.lower() for w in (REPO / "data/sample/tinyshakespeare.txt").read_text().split() if w.isalpha()})
    base = [[rng.choice(vocab) for _ in range(300)] for _ in range(150)]
    texts = [" ".join(w) for w in base]
    kinds = ["original"] * 150
    for i in range(30):
        texts.append("  ".join(base[i]).upper())
        kinds.append("exact")
    for i in range(30, 60):
        texts.append(_edit(base[i], 3, vocab, rng))
        kinds.append("near")
    for i in range(60, 90):
        texts.append(_edit(base[i], 22, vocab, rng))
        kinds.append("miss")
    similarity = [_jaccard(texts[150 + i], texts[i]) for i in range(90)]
    tmp = tmp_path_factory.mktemp("planted")
    return tmp, _write_jsonl(tmp / "corpus.jsonl", texts), kinds, similarity


def _run(cfg: CurateStageConfig, out: Path):
    summary = curate(cfg, out, log=lambda m: None)
    return summary, [r["text"] for r in iter_output(out)]


def test_planted_duplicates_are_removed_and_near_misses_kept(planted):
    tmp, corpus, kinds, similarity = planted
    near = [s for s, k in zip(similarity, kinds[150:]) if k == "near"]
    miss = [s for s, k in zip(similarity, kinds[150:]) if k == "miss"]
    print(f"planted Jaccard: near duplicates {min(near):.3f}-{max(near):.3f}, near-misses {min(miss):.3f}-{max(miss):.3f}")
    assert min(near) >= 0.9 and max(miss) <= 0.5
    summary, _ = _run(_config(tmp, [corpus], filters=NO_FILTERS), tmp / "out")
    kept_ids = {int(r["id"].rsplit("#", 1)[1]) for r in iter_output(tmp / "out")}
    removed = set(range(len(kinds))) - kept_ids
    duplicates = {i for i, k in enumerate(kinds) if k in ("exact", "near")}
    recall = len(removed & duplicates) / len(duplicates)
    precision = len(removed & duplicates) / max(len(removed), 1)
    print(f"threshold 0.8 ({summary.minhash['bands']} bands x {summary.minhash['rows']} rows): recall {recall:.3f}, "
          f"precision {precision:.3f}; exact {summary.exact_duplicates}, near {summary.near_duplicates}")
    assert recall > 0.95 and precision > 0.95
    assert summary.exact_duplicates == 30  # the case- and space-changed copies are exact after normalisation
    assert all(i in kept_ids for i in range(150))  # the first of each cluster stays
    assert summary.documents_in == 240 and summary.documents_out == len(kept_ids)


def test_lsh_probability_is_the_s_curve():
    assert lsh_probability(0.9, 20, 13) == pytest.approx(1 - (1 - 0.9**13) ** 20)
    assert lsh_probability(0.5, 20, 13) < 0.003 < 0.997 < lsh_probability(0.9, 20, 13)
    cfg = CurateStageConfig.model_validate({"input": ["x"]})
    assert cfg.minhash.rows_per_band() == 13  # (1/20)^(1/13) = 0.794: the midpoint at the 0.8 threshold


BAD = {
    "length": ("Too short to keep.", "length/too_short"),
    "language": ("Der Fluss fließt an der alten Mühle vorbei und hinunter in das Tal unter der Stadt. Jeden Frühling "
                 "öffnen die Bauern die Tore, damit das Wasser ihre Felder erreichen kann. Im Sommer schwimmen die "
                 "Kinder in den tiefen Becken nahe der steinernen Brücke.", "language/language_de"),
    "gopher_repetition": ("The mill wheel turns all day long in the river.\n" * 12, "gopher_repetition/dup_line_frac"),
    "gopher_quality": ("# " * 40 + GOOD, "gopher_quality/gopher_too_many_hashes"),
    "c4": (GOOD + "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n", "c4/lorem_ipsum"),
    "fineweb": ("Home\nAbout us\nContact\nNews\nShop\nCareers\nPress\nBlog\nHelp\nLogin\n" * 3 + GOOD,
                "fineweb/short_line_ratio"),  # a navigation menu: most lines under 30 characters
}


@pytest.mark.parametrize("name", list(BAD))
def test_each_filter_removes_its_bad_document_and_keeps_a_good_one(tmp_path, name):
    bad, reason = BAD[name]
    corpus = _write_jsonl(tmp_path / "docs.jsonl", [GOOD, bad])
    defaults = CurateStageConfig.model_validate({"input": ["x"]}).filters.model_dump()
    cfg = _config(tmp_path, [corpus], exact=False, minhash=None, filters=NO_FILTERS | {name: defaults[name]})
    summary, kept = _run(cfg, tmp_path / "out")
    print(name, summary.reasons)
    assert [k.strip() for k in kept] == [GOOD.strip()]  # C4 rewrites line ends; the good document stays
    assert summary.removed[name] == 1 and summary.reasons == {reason: 1}
    example = json.loads((tmp_path / "out" / "examples.jsonl").read_text().splitlines()[0])
    assert example["removed_by"] == name and example["text"] == bad


def test_outputs_are_deterministic_and_the_summary_complete(planted, tmp_path):
    from megaflow.data.tokenizer import train_tokenizer

    _, corpus, _, _ = planted
    tok = train_tokenizer([str(corpus)], 300, str(tmp_path / "tok"))
    cfg = _config(tmp_path, [corpus], filters=NO_FILTERS | {"length": {"min_words": 5}}, workers=2,
                  tokenizer=str(tmp_path / "tok"))
    runs = []
    for out in (tmp_path / "a", tmp_path / "b"):
        summary, _ = _run(cfg, out)
        shards = {p.name: gzip.decompress(p.read_bytes()) for p in sorted(out.glob("*.jsonl.gz"))}
        runs.append((shards, {k: v for k, v in summary.__dict__.items() if k not in ("seconds", "shards", "examples")}))
    assert runs[0] == runs[1] and len(runs[0][0]) == 2  # one shard per worker, byte-identical text
    written = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert written["documents_in"] == 240 and written["words_in"] == 240 * 300
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    kept = [r["text"] for r in iter_output(tmp_path / "a")]
    assert written["tokens_in"] == sum(len(tok.encode(t)) for t in texts)
    assert written["tokens_out"] == sum(len(tok.encode(t)) for t in kept) < written["tokens_in"]
    assert written["removed"]["exact_duplicate"] == 30 and written["minhash"]["p_candidate"]["0.9"] > 0.99
    assert not (tmp_path / "a" / "work").exists() and not list(tmp_path.glob("*.tmp-*"))


def _cli(tmp: Path, *args: str):
    return run_megaflow("curate", "--output", str(tmp / "out"), *args, cwd=tmp)


def test_bad_input_is_one_line_naming_file_and_line_and_nothing_is_written(tmp_path):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": broken\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(b"not gzip at all")
    cases = [((bad_json,), f"{bad_json}:2: not valid JSON"), ((empty,), "no documents (empty input)"),
             ((tmp_path / "missing.txt",), "missing.txt: file not found"), ((corrupt,), f"{corrupt}:1: cannot read compressed data")]
    for inputs, needle in cases:
        proc = _cli(tmp_path, "--input", *map(str, inputs))
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("megaflow:")]
        assert proc.returncode != 0 and len(lines) == 1 and needle in lines[0], proc.stderr[-1500:]
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    for override, needle in [("filters.c4.no_such_rule=1", "filters.c4.no_such_rule: unknown option"),
                             ("filters.nope={}", "filters.nope: unknown config key"),
                             ("minhash.threshold=1.5", "minhash.threshold")]:
        proc = _cli(tmp_path, "--input", str(bad_json), override)
        assert proc.returncode != 0 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-1500:]
