"""Write the synthetic instruction dataset (megaflow.data.synthetic) that the SFT learning test uses, or
with --preference its preference pairs (the reward-model and DPO tests).

    python tools/make_sft_data.py --corpus data/sample/tinyshakespeare.txt --out data/sample/sft-words \
        [--train 2000 --heldout 200 --seed 0 --tasks copy first last]
    python tools/make_sft_data.py --corpus data/sample/tinyshakespeare.txt --out data/sample/pref-words --preference
    python tools/make_sft_data.py --corpus data/sample/tinyshakespeare.txt --out data/sample/sft-words-noisy --noise 0.4

Prints the two paths; the files are prompt/response (or prompt/chosen/rejected) jsonl, which
`megaflow train sft` (`rm`, `dpo`) reads as they are. The same seed and counts give the same prompts in
both, so the preference set's held-out prompts are the SFT set's held-out prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaflow.data.synthetic import ALL_TASKS, DEFAULT_TASKS, write_instruction_data, write_preference_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="text file whose common words the examples use")
    parser.add_argument("--out", required=True, help="directory for train.jsonl and heldout.jsonl")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=ALL_TASKS)
    parser.add_argument("--preference", action="store_true", help="write chosen/rejected pairs (a wrong answer rejected)")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="share of training responses replaced by a wrong answer (the right one kept as `answer`)")
    args = parser.parse_args()
    if args.preference:
        paths = write_preference_data(args.corpus, args.out, args.train, args.heldout, args.seed, tuple(args.tasks))
    else:
        paths = write_instruction_data(args.corpus, args.out, args.train, args.heldout, args.seed, tuple(args.tasks),
                                       noise=args.noise)
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
