"""Write the raw corpus the curation pipeline starts from: the sample text's speeches plus what a web crawl
adds, planted so that curation has something to find (configs/pipelines/curate-tiny.yaml, docs/curation.md).

    python tools/make_curation_data.py --corpus data/sample/tinyshakespeare.txt --out data/sample/curate-raw

Writes OUT/train.jsonl.gz (one {"text", "kind"} record per document, shuffled) and OUT/heldout.txt
(every 10th speech, clean, never in train: the held-out text perplexity is measured on). Planted in train:
- exact duplicates: 10% of the speeches 8 more times each, some upper-cased or re-spaced;
- near duplicates: 5% of the speeches 4 more times each with one word changed;
- junk: navigation menus, cookie and lorem-ipsum boilerplate, lines of spam repeated, random letters.
`kind` says which each record is (original, exact, near, junk); curation does not read it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

MENU = ["Home", "About us", "Contact", "News", "Shop", "Careers", "Press", "Blog", "Help", "Login", "Sign up",
        "Privacy", "Terms", "Sitemap", "FAQ", "Support", "Cart", "Account"]
BOILERPLATE = ["We use cookies to improve your experience on our website. By continuing you accept our use of cookies.",
               "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore.",
               "Click here to subscribe to our newsletter and get 10% off your first order!!!",
               "All rights reserved. Copyright 2024. Terms and conditions apply. Read our privacy policy."]


def speeches(corpus: str) -> list[str]:
    return [b.strip() for b in Path(corpus).read_text(encoding="utf-8").split("\n\n") if b.strip()]


def junk(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # a navigation menu
        return "\n".join(rng.sample(MENU, rng.randint(8, len(MENU))))
    if kind == 1:  # boilerplate paragraphs
        return "\n".join(rng.choice(BOILERPLATE) for _ in range(rng.randint(3, 6)))
    if kind == 2:  # one spam line, repeated
        line = rng.choice(["BUY CHEAP WATCHES NOW best prices online", "free download full version crack keygen",
                           "hot singles in your area click here now"])
        return "\n".join([line] * rng.randint(6, 15))
    letters = "abcdefghijklmnopqrstuvwxyz"  # random letters in word-like groups
    return " ".join("".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(30, 120)))


def make(corpus: str, out: str, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    docs = speeches(corpus)
    heldout = docs[9::10]
    train = [d for i, d in enumerate(docs) if i % 10 != 9]
    records = [{"text": d, "kind": "original"} for d in train]
    for d in rng.sample(train, len(train) // 10):
        for _ in range(8):
            variant = rng.randrange(3)
            records.append({"text": d.upper() if variant == 1 else d.replace(" ", "  ") if variant == 2 else d,
                            "kind": "exact"})
    for d in rng.sample(train, len(train) // 20):
        words = d.split(" ")
        for _ in range(4):
            w = list(words)
            w[rng.randrange(len(w))] = rng.choice(["verily", "forsooth", "anon", "prithee"])
            records.append({"text": " ".join(w), "kind": "near"})
    words_now = sum(len(r["text"].split()) for r in records)
    junk_words = 0
    while junk_words < 0.35 * words_now:  # junk: about a quarter of the raw corpus's words
        j = junk(rng)
        records.append({"text": j, "kind": "junk"})
        junk_words += len(j.split())
    rng.shuffle(records)
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(path / "train.jsonl.gz", "wb", mtime=0) as f:  # mtime 0: the same bytes every time
        f.write("".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))
    (path / "heldout.txt").write_text("\n\n".join(heldout) + "\n", encoding="utf-8")
    return path / "train.jsonl.gz", path / "heldout.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="data/sample/tinyshakespeare.txt")
    parser.add_argument("--out", default="data/sample/curate-raw")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for p in make(args.corpus, args.out, args.seed):
        print(p)


if __name__ == "__main__":
    main()
