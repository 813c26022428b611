"""Build the DPO preference data (examples/data/dpo_*.jsonl) from the shipped chat data.

Each chat row of examples/data/train.jsonl and eval.jsonl becomes one preference row: the same
question, the correct answer as "chosen" and a near miss as "rejected" - the same number with
one digit changed (459 -> 479, "four hundred fifty-nine" -> "four hundred seventy-nine"), the
kind of slip the SFT model makes on held-out numbers. The eval rows keep the 100 numbers that no
training row mentions.

    python examples/make_preferences.py          # writes dpo_train.jsonl and dpo_eval.jsonl

Seeded (--seed, default 0): the files come out byte-identical on every machine.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_base import NUMBERS, number_words, write_jsonl

HERE = Path(__file__).resolve().parent
WORDS_TO_NUMBER = {number_words(n): n for n in range(NUMBERS)}


def near_miss(n: int, rng: random.Random) -> int:
    """`n` with one of its digits changed to another digit (never a new leading zero)."""
    digits = list(str(n))
    i = rng.randrange(len(digits))
    allowed = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0"
                                                                   and len(digits) > 1)]
    digits[i] = rng.choice(allowed)
    return int("".join(digits))


def preference_row(row: dict, rng: random.Random) -> dict:
    """{"prompt", "chosen", "rejected"} of one shipped chat row."""
    question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
    if answer.isdigit():
        return {"prompt": question, "chosen": answer, "rejected": str(near_miss(int(answer), rng))}
    n = WORDS_TO_NUMBER[answer]
    return {"prompt": question, "chosen": answer, "rejected": number_words(near_miss(n, rng))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(HERE / "data"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    for split in ("train", "eval"):
        source = Path(args.data_dir) / f"{split}.jsonl"
        rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
        prefs = [preference_row(r, rng) for r in rows]
        write_jsonl(prefs, Path(args.data_dir) / f"dpo_{split}.jsonl")
        print(f"wrote {len(prefs)} preference rows to {Path(args.data_dir) / f'dpo_{split}.jsonl'}")


if __name__ == "__main__":
    main()
