"""A small instruction dataset megaflow makes for itself, so SFT can be tested to *learn* without downloads.

Each example asks for an exact answer about three of the most common words of the pretraining corpus,
one word a line:

    copy      "Repeat the words:\nthou\nart\ngone"         -> "thou\nart\ngone"
    first     "What is the first word?\nthou\nart\ngone"   -> "thou"
    last      "What is the last word?\nthou\nart\ngone"    -> "gone"
    reverse   "Reverse the words:\nthou\nart\ngone"        -> "gone\nart\nthou"   (optional)
    add       "What is 7 plus 5?"                          -> "12"                 (optional)
    uppercase "Write in capitals:\nthou\nart"              -> "THOU\nART"          (optional)

Why this shape: the skill to learn is only which of the prompt's tokens to copy, at a fixed distance
(a fixed word count) — attention patterns a tiny model picks up in a few hundred steps. One word a line
makes a word the same tokens in the prompt and in the answer (with spaces, "thou" after a space and at
the start of the answer are different tokens). The answers are exact, so held-out exact match measures
learning directly; held-out prompts are word sequences never seen in training. Measured here: the
40-step test pretrain (tiny llama, vocab 1024) fine-tuned 400 steps (16 packed rows of 64 tokens, lr 6e-3)
went from 0% to ~60% held-out exact match on the default tasks; reverse stayed near 0% at that budget,
so it, addition (100 facts to memorise) and capitals (a new spelling per word) are off by default.

Preference pairs (`make_preference_data`) reuse the instruction examples: the chosen response is the
exact answer, the rejected one a plausible wrong answer built from the same prompt words (another word
of the list for first/last, the words in another order for copy). Telling them apart needs the prompt,
so a reward model or DPO learns the task's rule, not a surface feature of the answers.

Deterministic: the same corpus, counts and seed give byte-identical files.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

DEFAULT_TASKS = ("copy", "first", "last")
ALL_TASKS = DEFAULT_TASKS + ("reverse", "add", "uppercase")


def common_words(text: str, count: int = 200, min_len: int = 3, max_len: int = 8) -> list[str]:
    """The `count` most frequent lower-case words of `text` (ties broken alphabetically)."""
    counts = Counter(w for w in re.findall(r"\b[a-z]+\b", text) if min_len <= len(w) <= max_len)
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:count]]


def _example(task: str, rng: random.Random, words: list[str], n_words: int) -> tuple[str, str]:
    picked = rng.sample(words, n_words)
    listed = "\n".join(picked)
    if task == "copy":
        return f"Repeat the words:\n{listed}", listed
    if task == "reverse":
        return f"Reverse the words:\n{listed}", "\n".join(reversed(picked))
    if task == "first":
        return f"What is the first word?\n{listed}", picked[0]
    if task == "last":
        return f"What is the last word?\n{listed}", picked[-1]
    if task == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    if task == "uppercase":
        return f"Write in capitals:\n{listed}", listed.upper()
    raise ValueError(f"unknown task {task!r}; known: {', '.join(ALL_TASKS)}")


def make_instruction_data(corpus_text: str, n_train: int = 2000, n_heldout: int = 200, seed: int = 0,
                          tasks: tuple[str, ...] = DEFAULT_TASKS, vocab: int = 30,
                          n_words: int = 3, noise: float = 0.0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records {"prompt", "response", "task"}: tasks in turn, `n_words` of the `vocab`
    most common corpus words per prompt, no prompt in both sets (nor twice in one). Raises ValueError if
    the corpus has too few words for the requested counts.

    With `noise` > 0, that share of the training responses is a plausible wrong answer (wrong_answer) and
    every training record keeps the right one as `answer`: demonstrations an imitator plateaus on and a
    verifier (RL with an exact-match reward) sees through. Held-out records stay right."""
    words = common_words(corpus_text, vocab)
    if len(words) < max(8, n_words):
        raise ValueError(f"the corpus has only {len(words)} distinct words of 3-8 letters; need at least 8")
    rng, seen = random.Random(seed), set()
    splits: list[list[dict]] = [[], []]
    for split, n in ((0, n_train), (1, n_heldout)):
        tries = 0
        while len(splits[split]) < n:
            task = tasks[len(splits[split]) % len(tasks)]
            prompt, answer = _example(task, rng, words, n_words)
            tries += 1
            if tries > 100 * (n + 10):
                raise ValueError(f"cannot make {n} distinct examples of tasks {tasks} from {len(words)} words")
            if prompt in seen:
                continue
            seen.add(prompt)
            splits[split].append({"prompt": prompt, "response": answer, "task": task})
    if noise:
        flip = random.Random(seed + 2)
        splits[0] = [r | {"answer": r["response"]} | ({"response": wrong_answer(r["task"], r["prompt"], r["response"], flip)}
                                                      if flip.random() < noise else {}) for r in splits[0]]
    return splits[0], splits[1]


def wrong_answer(task: str, prompt: str, answer: str, rng: random.Random) -> str:
    """A wrong answer made of the prompt's own words: another of them (first, last), or the same words in
    another order (copy, reverse); for add, a near miss; for uppercase, the words left in lower case."""
    picked = prompt.split("\n")[1:]
    if task in ("first", "last"):
        return rng.choice([w for w in picked if w != answer])
    if task in ("copy", "reverse"):
        order = picked[:]
        while "\n".join(order) == answer:
            rng.shuffle(order)
        return "\n".join(order)
    if task == "add":
        return str(int(answer) + rng.choice([-2, -1, 1, 2]))
    if task == "uppercase":
        return "\n".join(picked)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(ALL_TASKS)}")


def make_preference_data(corpus_text: str, n_train: int = 1000, n_heldout: int = 200, seed: int = 0,
                         tasks: tuple[str, ...] = DEFAULT_TASKS) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records {"prompt", "chosen", "rejected", "task"} from make_instruction_data's
    examples (the same seed gives the same prompts) with a wrong answer per prompt as the rejected one."""
    rng = random.Random(seed + 1)
    return tuple([{"prompt": r["prompt"], "chosen": r["response"],
                   "rejected": wrong_answer(r["task"], r["prompt"], r["response"], rng), "task": r["task"]}
                  for r in split]
                 for split in make_instruction_data(corpus_text, n_train, n_heldout, seed, tasks))


def _write_jsonl(out_dir: str | Path, train: list[dict], heldout: list[dict]) -> tuple[Path, Path]:
    """OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl, each written whole, then renamed into place."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, records in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        path, tmp = out_dir / name, out_dir / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


def write_preference_data(corpus: str | Path, out_dir: str | Path, n_train: int = 1000, n_heldout: int = 200,
                          seed: int = 0, tasks: tuple[str, ...] = DEFAULT_TASKS) -> tuple[Path, Path]:
    """Write make_preference_data's OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl."""
    text = Path(corpus).read_text(encoding="utf-8", errors="replace")
    return _write_jsonl(out_dir, *make_preference_data(text, n_train, n_heldout, seed, tasks))


def write_instruction_data(corpus: str | Path, out_dir: str | Path, n_train: int = 2000, n_heldout: int = 200,
                           seed: int = 0, tasks: tuple[str, ...] = DEFAULT_TASKS, noise: float = 0.0) -> tuple[Path, Path]:
    """Write OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl (each written whole, then renamed into place)."""
    text = Path(corpus).read_text(encoding="utf-8", errors="replace")
    return _write_jsonl(out_dir, *make_instruction_data(text, n_train, n_heldout, seed, tasks, noise=noise))
