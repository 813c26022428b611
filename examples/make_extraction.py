"""Build the structured-extraction task (examples/data/extract_{train,eval}.jsonl).

Each row is a chat row: the user gives one sentence about an order and asks for its five fields
as JSON; the assistant replies with one compact JSON object, keys always in this order:

    {"name": "Ada Brook", "item": "lamp", "count": 3, "city": "Lisbon", "day": "Friday"}

The sentences come from a dozen templates that put the fields in different orders and words;
the count is written in digits or in words ("three" -> 3) and the item may be plural in the
sentence but is always singular in the reply, so the task asks for more than copying. Eval rows
use first names and surnames that no training row uses, so a model cannot score by remembering
people. Templates and word lists were written for minift.

    python examples/make_extraction.py            # 300 train rows, 60 eval rows
    python examples/make_extraction.py --train 500 --eval 100 --seed 1

Seeded (--seed, default 0): the files come out byte-identical on every machine.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIELDS = ("name", "item", "count", "city", "day")
INSTRUCTION = ("Extract the fields name, item, count, city and day from the sentence. "
               "Reply with one JSON object and nothing else.")

FIRST = ["Ada", "Bruno", "Clara", "Dmitri", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
         "Kaia", "Lucas", "Mira", "Nils", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tove",
         "Umar", "Vera", "Wendel", "Ximena", "Yusuf", "Zora", "Anouk", "Bilal", "Carmen", "Dario"]
LAST = ["Brook", "Castell", "Dunmore", "Ekberg", "Fairley", "Gallo", "Hartwig", "Imre", "Jansen",
        "Kovacs", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov", "Quaid", "Rinaldi",
        "Sato", "Torres", "Ulloa", "Varga", "Whitlock", "Yilmaz", "Zeller", "Abara", "Bexley"]
# (singular, plural)
ITEMS = [("lamp", "lamps"), ("chair", "chairs"), ("bicycle", "bicycles"), ("kettle", "kettles"),
         ("backpack", "backpacks"), ("umbrella", "umbrellas"), ("notebook", "notebooks"),
         ("teapot", "teapots"), ("blanket", "blankets"), ("helmet", "helmets"), ("mirror", "mirrors"),
         ("shelf", "shelves"), ("knife", "knives"), ("box", "boxes"), ("rug", "rugs"),
         ("candle", "candles"), ("printer", "printers"), ("guitar", "guitars"), ("tent", "tents"),
         ("clock", "clocks")]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Tunis", "Krakow", "Quito", "Perth", "Dublin",
          "Hanoi", "Tallinn", "Accra", "Porto", "Seville", "Bergen", "Cusco", "Malmo", "Leeds", "Turin"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve"]

# {name} {n} {items} {city} {day}; {items} agrees with {n}
TEMPLATES = [
    "{name} ordered {n} {items} to be delivered to {city} on {day}.",
    "On {day}, {name} wants {n} {items} shipped to {city}.",
    "Please send {n} {items} to {city} for {name} by {day}.",
    "Delivery for {name}: {n} {items}, city {city}, day {day}.",
    "{name} from {city} asked for {n} {items}, to arrive on {day}.",
    "Can {n} {items} reach {city} on {day}? The buyer is {name}.",
    "Order note - {day}: {n} {items} for {name} in {city}.",
    "{city} store, {day}: {name} picks up {n} {items}.",
    "The customer {name} needs {n} {items} in {city} before {day}.",
    "Ship to {city} ({name}), quantity {n}, product: {items}, on {day}.",
    "By {day} we must bring {n} {items} to {name}, who lives in {city}.",
    "{name} booked {n} {items}; pickup is {day} at our {city} branch.",
]


def split_names(rng: random.Random) -> tuple[list, list]:
    """Disjoint (train, eval) first-name and surname lists: a fifth of each held out for eval."""
    first, last = FIRST[:], LAST[:]
    rng.shuffle(first)
    rng.shuffle(last)
    kf, kl = len(first) // 5, len(last) // 5
    return (first[kf:], last[kl:]), (first[:kf], last[:kl])


def make_row(rng: random.Random, names: tuple[list, list]) -> dict:
    name = f"{rng.choice(names[0])} {rng.choice(names[1])}"
    singular, plural = rng.choice(ITEMS)
    count = rng.randint(1, 12)
    n = WORDS[count] if rng.random() < 0.4 else str(count)
    if n == "one" and rng.random() < 0.5:
        n = "a" if singular[0] not in "aeiou" else "an"
    record = {"name": name, "item": singular, "count": count, "city": rng.choice(CITIES),
              "day": rng.choice(DAYS)}
    sentence = rng.choice(TEMPLATES).format(name=name, n=n, items=singular if count == 1 else plural,
                                            city=record["city"], day=record["day"])
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\nSentence: {sentence}"},
                         {"role": "assistant", "content": json.dumps(record)}]}


def write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=300, help="training rows")
    parser.add_argument("--eval", type=int, default=60, help="held-out rows (unseen names)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw")
    parser.add_argument("--out", default=str(HERE / "data"), help="output folder")
    args = parser.parse_args(argv)
    if args.train <= 0 or args.eval <= 0:
        parser.error("--train and --eval must be positive")
    rng = random.Random(args.seed)
    train_names, eval_names = split_names(rng)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "extract_train.jsonl", [make_row(rng, train_names) for _ in range(args.train)])
    write_jsonl(out / "extract_eval.jsonl", [make_row(rng, eval_names) for _ in range(args.eval)])
    print(f"wrote {args.train} + {args.eval} rows to {out}/extract_{{train,eval}}.jsonl")


if __name__ == "__main__":
    main()
