"""``python -m minift.planning.long_context``: the longest context per method on 24 / 48 / 80 GB
with the long-context recipe, traced.

The recipe is what docs/long_context.md describes for extending Llama-3.1-8B past the length it
was trained for: LoRA / QLoRA with trainable embeddings and norms (``modules_to_save`` =
embed_tokens, norm) or full fine-tuning, shifted sparse attention while training
(``s2_attention``, group a quarter of the sequence), and the lean memory setting of
`minift.planning.tables` (checkpointing, activation offload, MLP tiles, chunked loss, paged 8-bit
states stepped in backward, bf16 adapters; QLoRA's lm_head in NF4). Past the preset's
``max_position_embeddings`` (131,072) the model is assumed extended with
``minift.extend_context(model, seq_len, method="yarn")``, which changes the RoPE frequencies and
nothing of the step's memory. Each card keeps a 1 GiB reserve for the CUDA context.

Every length is found by tracing the step (`minift.planning.tables.longest`); traces are shared
between the three cards of a method, and with those of an earlier, interrupted run written to the same
file. The JSON is rewritten after every search.
"""
from __future__ import annotations

import argparse
import json
import os
import time

from minift.planning.tables import LEAN, RESERVE, _commit, _write, longest

CARDS = {"24GB": 24 * 10**9, "48GB": 48 * 10**9, "80GB": 80 * 10**9}
PRESET = "llama-3.1-8b"
# the lean setting per method with long-context tiles (as tables.LONG for QLoRA) and the recipe
RECIPE = {m: dict(LEAN[m], mlp_tile_size=8192, loss_chunk_size=1024, s2_attention=True,
                  **({"modules_to_save": ["embed_tokens", "norm"]} if m != "full" else {}))
          for m in ("qlora", "lora", "full")}
ASSUMED = ("s2_attention (group: a quarter of the sequence); modules_to_save embed_tokens and norm for "
           "LoRA and QLoRA; minift.extend_context(model, seq_len, method='yarn') past 131072 tokens "
           "(memory-neutral); the lean memory setting of minift.planning.tables; 1 GiB reserve a card")


def run(out: str, step: int = 4096, methods=("qlora", "lora", "full"), cards=tuple(CARDS)) -> dict:
    """Card by card (the smallest first), method by method; traces already in ``out`` (an earlier,
    interrupted run of the same settings) are reused."""
    started = time.perf_counter()
    earlier = {}
    if os.path.exists(out):
        with open(out, encoding="utf-8") as f:
            earlier = json.load(f).get("methods", {})
    result = {"what": "longest sequence at batch 1 whose traced step (fake tensors, CUDA path) fits each "
                      "card, Llama-3.1-8B, long-context recipe", "assumed": ASSUMED, "step_tokens": step,
              "code": _commit(), "command": "python -m minift.planning.long_context", "methods": {}}
    memos = {}
    # methods and cards not searched this time keep their earlier results (same settings only)
    result["methods"].update({m: row for m, row in earlier.items() if m not in methods})
    for method in methods:
        settings = {k: (str(v) if k == "adapter_dtype" else v) for k, v in RECIPE[method].items()}
        before = earlier.get(method, {})
        same = before.get("settings") == settings
        memos[method] = {t["seq_len"]: t for card in before.get("cards", {}).values() for t in card["traces"]} \
            if same else {}
        kept = {name: card for name, card in before.get("cards", {}).items() if same and name not in cards}
        result["methods"][method] = {"settings": settings, "cards": kept}
    for name in cards:
        for method in methods:
            found = longest(PRESET, CARDS[name] - RESERVE, RECIPE[method], step=step, method=method,
                            memo=memos[method])
            result["methods"][method]["cards"][name] = dict(found, card_bytes=CARDS[name],
                                                            budget_bytes=CARDS[name] - RESERVE)
            _write(out, result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    _write(out, result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minift.planning.long_context",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/benchmarks/long_context_traced.json", help="JSON result file")
    parser.add_argument("--step", type=int, default=4096, help="resolution of the search, tokens")
    parser.add_argument("--methods", default="qlora,lora,full", help="comma-separated methods")
    parser.add_argument("--cards", default=",".join(CARDS), help="comma-separated cards, of " + ", ".join(CARDS))
    args = parser.parse_args(argv)
    result = run(args.out, args.step, tuple(m for m in args.methods.split(",") if m),
                 tuple(c for c in args.cards.split(",") if c))
    for method, row in result["methods"].items():
        print(method, {name: card["seq_len"] for name, card in row["cards"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
