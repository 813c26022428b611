"""``python -m minift eval MODEL_DIR``: the long-context checks of a model (optionally with a LoRA
adapter): passkey retrieval over lengths x depths and perplexity by context length. Each prints
its table and writes a PNG and a JSON file under ``--out``; bad input is one line and exit 2.
``--mc FILE`` scores multiple-choice questions; with ``--adapter`` it scores the base before the
adapter is loaded and after, and prints the accuracy drop against the 5-point budget.

    python -m minift eval examples/base --passkey 256,512 --ppl 128,256,512 \\
        --texts examples/data/general.jsonl --out runs/eval
    python -m minift eval examples/base --adapter runs/sft/adapter \\
        --mc examples/data/general_mc.jsonl --shots 3
"""
from __future__ import annotations

from pathlib import Path

import torch

from minift.evaluation.forgetting import accuracy_drop, evaluate, load_texts
from minift.evaluation.multiple_choice import load_choice_rows
from minift.files import write_json
from minift.lora.adapter import load_adapter
from minift.models.loading import load_model
from minift.models.tokenizer import load_tokenizer


def _ints(text: str, flag: str, parser) -> list:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated token counts, got {text!r}")
    if not values:
        parser.error(f"{flag}: give at least one length")
    return values


def add_eval_arguments(parser) -> None:
    add = parser.add_argument
    add("model", help="Hugging Face checkpoint folder (config.json, weights, tokenizer.json)")
    add("--adapter", default=None, help="a PEFT LoRA adapter folder to load onto the model")
    add("--passkey", default=None, metavar="LENGTHS",
        help="passkey retrieval at these prompt lengths in tokens, comma-separated, e.g. 1024,4096")
    add("--depths", default="0,0.25,0.5,0.75,1", help="passkey depths (0: first, 1: last), comma-separated")
    add("--trials", type=int, default=5, help="passkey prompts per length x depth cell")
    add("--digits", type=int, default=5, help="digits of each pass key")
    add("--method", default="generate", choices=("generate", "score"),
        help="passkey: greedy generation, or the key's tokens as argmax of one teacher-forced forward")
    add("--seed", type=int, default=0, help="seeds the pass keys")
    add("--ppl", default=None, metavar="LENGTHS",
        help="perplexity of --texts in windows of these lengths in tokens, comma-separated")
    add("--texts", default=None, help="plain-text JSONL ({\"text\": ...}) for --ppl")
    add("--buckets", type=int, default=4, help="--ppl: position buckets per window")
    add("--max-windows", type=int, default=None, help="--ppl: windows per length at most (default: all)")
    add("--mc", default=None, metavar="FILE",
        help="multiple-choice JSONL ({\"question\", \"choices\", \"answer\"}) scored by log-likelihood")
    add("--shots", type=int, default=0, help="--mc: few-shot examples per question, drawn with --seed")
    add("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype")
    add("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    add("--out", default="runs/eval", help="folder for the PNG and JSON files")


def run_eval(args, parser) -> int:
    """Run the asked checks; print each table; write <out>/passkey.{png,json} and
    <out>/perplexity_by_length.{png,json}."""
    if args.passkey is None and args.ppl is None and args.mc is None:
        parser.error("give --passkey LENGTHS, --ppl LENGTHS and/or --mc FILE: nothing to evaluate")
    if args.ppl is not None and args.texts is None:
        parser.error("--ppl scores the texts of --texts; give a plain-text JSONL file")
    kwargs = {}
    if args.passkey is not None:
        try:
            depths = [float(t) for t in args.depths.split(",") if t.strip()]
        except ValueError:
            parser.error(f"--depths: expected comma-separated numbers in [0, 1], got {args.depths!r}")
        kwargs["passkey"] = {"lengths": _ints(args.passkey, "--passkey", parser), "depths": depths,
                             "trials": args.trials, "seed": args.seed, "digits": args.digits,
                             "method": args.method}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        texts = load_texts(args.texts) if args.texts is not None else None
        model = load_model(args.model, dtype=getattr(torch, args.dtype), device=device)
        tokenizer = load_tokenizer(args.model)
        choice = {}
        if args.mc is not None:
            choice = {"mc_rows": load_choice_rows(args.mc), "mc_fewshot": args.shots, "mc_seed": args.seed}
        before = evaluate(model, tokenizer, device=device, **choice) if choice and args.adapter else None
        if args.adapter is not None:
            load_adapter(model, args.adapter)
        if args.ppl is not None:
            kwargs["by_length"] = {"lengths": _ints(args.ppl, "--ppl", parser), "buckets": args.buckets,
                                   "max_windows": args.max_windows}
            kwargs["general_texts"] = texts
        found = evaluate(model, tokenizer, device=device, **kwargs, **choice)
    except (ValueError, FileNotFoundError, OSError) as err:
        parser.error(str(err))
    out = Path(args.out)
    for name in ("passkey", "perplexity_by_length"):
        if name in found:
            result = found[name]
            print(result.table())
            png = result.save_png(out / f"{name}.png")
            write_json(out / f"{name}.json", result.as_dict(), sort_keys=True)
            print(f"wrote {png} and {out / f'{name}.json'}")
    if "multiple_choice" in found:
        report = {"after" if before else "model": _mc_summary(found["multiple_choice"])}
        if before:
            report["before"] = _mc_summary(before["multiple_choice"])
            report["drop"] = accuracy_drop(before["multiple_choice"], found["multiple_choice"])
        for key in ("before", "after", "model"):
            if key in report:
                print(f"multiple choice {key}: acc {report[key]['acc']:.2%}  acc_norm "
                      f"{report[key]['acc_norm']:.2%}  ({report[key]['n']} questions, {args.shots}-shot)")
        if before:
            drop = report["drop"]
            print(f"acc drop {drop['acc']['drop'] * 100:+.1f} points (budget {drop['budget'] * 100:.0f}): "
                  f"{'PASS' if drop['within_budget'] else 'FAIL'}")
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "multiple_choice.json", report, sort_keys=True)
        print(f"wrote {out / 'multiple_choice.json'}")
    return 0


def _mc_summary(result: dict) -> dict:
    return {k: result[k] for k in ("acc", "acc_norm", "n", "num_fewshot")}
