"""Extend the shipped base to 4x the length it was trained on, and measure passkey retrieval.

`examples/base` was pretrained on windows of 64 tokens (`examples/make_base.py --seq-len`; its
config.json says 512, what its RoPE would allow, not what it saw). This example takes 64 as its
trained length L and fine-tunes it for 4L = 256 tokens with LongLoRA's recipe:

    minift.extend_context (yarn)  +  LoRA  +  S²-Attn while training at 4L
                                  +  trainable embedding and norms (modules_to_save)

The base has never seen a pass key (it scores 0 at every length), so a first stage teaches the
look-up at the trained length; LongLoRA starts from a model that already retrieves within its
context. Both stages train on passkey prompts built by `minift.evaluation.passkey.passkey_prompt`
(the evaluation's own machinery) followed by the answer and a full stop, mixed with windows of
the base's own kind of prose (`make_base.prose_document`, every token trained):

1. the look-up at L (`--task-steps`): full fine-tuning, rows of L/2..L tokens, the needle at a
   uniform random depth, full attention; once per RoPE setting (the arms that extend share it);
2. the extension (`--steps`): the arm's recipe, rows of L/2..4L tokens. With S²-Attn a token
   sees only its own group while training, so the needle is put within half a group
   (`--near`) before the question: every training row can be answered in every arm. The
   evaluation uses full attention, so its needles at depth 0..1 of 4L lie up to 4L away.

Keys have 4 digits (one token each), drawn afresh for every row from the 9,000 keys less the
evaluation's. No evaluated key is ever trained on (the JSON records the check), so a right answer
is a copy of the key the model read, not a key it learned. Each length n
of the evaluation (`passkey_grid`, greedy generation) is the prompt and its answer together:
the prompt has n minus the answer's tokens, so at L the whole trial fits the trained length.
Passkey accuracy at L, 2L and 4L is printed for the base, the extended base, after stage 1 and
after stage 2 for each arm, with the loss at 4L (full attention) of held-out passkey answers
(evaluation keys) and of held-out prose:

* full: extend_context + LoRA + S²-Attn + modules_to_save=["embed_tokens", "norm"]
* no_s2: the same with full attention while training
* no_modules_to_save: the same with LoRA adapters only
* no_extend: the same without extend_context (RoPE unscaled, stage 1 too)

The prompt is shorter than passkey_grid's default, which takes 108 tokens with this tokenizer
(more than L): no intro, the needle " The key is <key>." and the question " The key is".

    python examples/train_long_context.py --out docs/benchmarks/long_context_passkey_cpu.json \\
        --png docs/long_context_passkey.png
    python examples/train_long_context.py --quick --out /tmp/lc.json     # a short run (the test)
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from make_base import prose_document, token_stream

import minift
from minift.bench.runinfo import git_commit, git_modified, machine_info
from minift.evaluation.passkey import passkey_grid, passkey_prompt
from minift.files import write_json
from minift.names import IGNORE_INDEX
from minift.objectives.sft import evaluate

HERE = Path(__file__).resolve().parent
TRAINED_LENGTH = 64  # examples/make_base.py pretrains on windows of 64 tokens
TEXTS = {"intro": "", "needle": " The key is {key}.", "question": " The key is"}
ARMS = {
    "full": dict(extend=True, s2=True, save=True),
    "no_s2": dict(extend=True, s2=False, save=True),
    "no_modules_to_save": dict(extend=True, s2=True, save=False),
    "no_extend": dict(extend=False, s2=True, save=True),
}
SAVED = ["embed_tokens", "norm"]


# ---- data --------------------------------------------------------------------------------
def answer_ids(tokenizer, key: str) -> list:
    return tokenizer.encode(" " + key + ".")


def draw_key(rng: random.Random, digits: int, excluded: set) -> str:
    while (key := str(rng.randrange(10 ** (digits - 1), 10 ** digits))) in excluded:
        pass
    return key


def passkey_row(tokenizer, n: int, depth: float, key: str) -> dict:
    """A passkey prompt and its answer " <key>.", n tokens together; only the answer is trained."""
    answer = answer_ids(tokenizer, key)
    p = passkey_prompt(tokenizer, n - len(answer), depth, key, **TEXTS)
    return {"input_ids": p.ids + answer, "labels": [IGNORE_INDEX] * len(p.ids) + answer}


def passkey_rows(tokenizer, count: int, lengths: tuple, digits: int, excluded: set,
                 rng: random.Random, near: int | None = None) -> tuple[list, set]:
    """`count` passkey prompts, each followed by " <key>." (only those tokens trained) and exactly
    a length drawn from `lengths` (an inclusive range) in all, with a fresh key of `digits` digits
    not in `excluded`. The needle goes at a uniform random depth, or, with `near`, at a depth
    within about `near` tokens before the question. Also the keys used."""
    rows, used = [], set()
    for _ in range(count):
        key = draw_key(rng, digits, excluded)
        n = rng.randint(*lengths)
        depth = rng.random()
        if near is not None:
            depth = 1.0 - depth * min(1.0, near / n)
        rows.append(passkey_row(tokenizer, n, depth, key))
        used.add(key)
    return rows, used


def text_rows(tokenizer, count: int, length: int, seed: int) -> list:
    """`count` windows of `length` tokens of make_base's prose (documents drawn with another seed
    than its corpus), every token trained."""
    rng = random.Random(seed)
    docs = [prose_document(rng) for _ in range(count * length // 40 + 10)]  # ~60 tokens a document
    stream = token_stream(tokenizer, docs).tolist()
    windows = [stream[i:i + length] for i in range(0, len(stream) - length + 1, length)][:count]
    return [{"input_ids": w, "labels": list(w)} for w in windows]


def datasets(tokenizer, eval_keys: set, args) -> tuple[dict, set]:
    """The rows of both stages (fresh keys, none of them an evaluation key) and held-out rows at
    4L (keys: the evaluation's, so none was trained on); and the keys trained on."""
    short, long = args.trained_length, 4 * args.trained_length
    rng = random.Random(args.seed + 1)
    task, used1 = passkey_rows(tokenizer, args.task_steps * args.task_batch, (short // 2, short),
                               args.digits, eval_keys, rng)
    ext, used2 = passkey_rows(tokenizer, args.steps * args.batch, (short // 2, long), args.digits,
                              eval_keys, rng, near=args.near)
    held_rng, keys = random.Random(args.seed + 2), sorted(eval_keys)
    held = [passkey_row(tokenizer, long, held_rng.random(), keys[i % len(keys)]) for i in range(32)]
    return {"task": task + text_rows(tokenizer, round(len(task) * args.text_share), short, args.seed + 100),
            "extend": ext + text_rows(tokenizer, round(len(ext) * args.text_share2), long, args.seed + 200),
            "heldout_answers_4x": held, "heldout_text_4x": text_rows(tokenizer, 8, long, args.seed + 300)
            }, used1 | used2


# ---- models and runs ---------------------------------------------------------------------
def load_base(base: Path, trained_length: int):
    model = minift.load_model(base, dtype=torch.float32)
    # what the base was trained on, so that extend_context's factor is (new length) / (trained length)
    model.config.max_position_embeddings = trained_length
    return model


def extended_base(base: Path, extend: bool, args):
    model = load_base(base, args.trained_length)
    if extend:
        return minift.extend_context(model, 4 * args.trained_length, method=args.rope)
    model.config.max_position_embeddings = 4 * args.trained_length  # RoPE unscaled
    return model


def grid(model, tokenizer, args):
    """passkey_grid at L, 2L, 4L tokens of prompt and answer together."""
    return passkey_grid(model, tokenizer, [n - args.answer_length for n in args.lengths], args.depths,
                        args.trials, args.eval_seed, digits=args.digits, batch_size=50, **TEXTS)


def per_length(result, args) -> dict:
    """Accuracy by length of prompt and answer together (the prompt is answer_length shorter)."""
    return {str(n + args.answer_length): float(row.mean()) for n, row in zip(result.lengths, result.accuracy)}


def run_stage(model, rows, args, method: str, steps: int, batch: int, lr: float, s2: bool) -> dict:
    """One `minift.train` run; its per-step losses and seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        config = minift.TrainConfig(
            method=method, learning_rate=lr, warmup_ratio=args.warmup, micro_batch_size=batch,
            max_steps=steps, bf16=False, progress=False, output_dir=tmp, seed=args.seed, device="cpu",
            s2_attention=s2, s2_group_size=args.group_size if s2 else None)
        started = time.perf_counter()
        minift.train(model, rows, config)
        seconds = time.perf_counter() - started
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    return {"method": method, "steps": steps, "micro_batch_size": batch, "learning_rate": lr,
            "s2_attention": s2, "seconds": round(seconds, 1),
            "losses": [round(json.loads(x)["loss"], 4) for x in lines]}


def heldout_losses(model, data) -> dict:
    """Mean token loss at 4L (full attention): the answers (" <key>.") of 32 passkey rows whose
    keys are evaluation keys (so none was trained on), and 8 prose windows."""
    config = minift.TrainConfig(method="lora", bf16=False, progress=False, micro_batch_size=8)
    return {name: round(evaluate(model, data[f"heldout_{name}_4x"], config, "cpu")["eval_loss"], 4)
            for name in ("answers", "text")}


def report(label: str, accuracy: dict) -> str:
    return f"{label}: " + ", ".join(f"{n}: {a:.2f}" for n, a in accuracy.items())


def run_arms(names, base, tokenizer, data, args, out, write) -> None:
    """Stage 1 once per RoPE setting (the look-up at L, full fine-tuning), then each arm's stage 2
    on a copy of it."""
    after_task = {}  # RoPE setting ("yarn" or "none") -> the model after stage 1
    for name in names:
        arm, t0 = ARMS[name], time.perf_counter()
        setting = args.rope if arm["extend"] else "none"
        if setting not in after_task:
            torch.manual_seed(args.seed)
            model = extended_base(base, arm["extend"], args)
            stage1 = run_stage(model, data["task"], args, "full", args.task_steps, args.task_batch,
                               args.lr, False)
            result = grid(model, tokenizer, args)
            out["after_task"][setting] = {"stage1_task_at_L": stage1, "accuracy": per_length(result, args),
                                          "heldout_loss_4x": heldout_losses(model, data),
                                          "passkey": result.as_dict()}
            print(report(f"after stage 1 (the look-up at L, rope {setting}, {stage1['seconds']:.0f} s)",
                         out["after_task"][setting]["accuracy"]), flush=True)
            after_task[setting] = model
            write()
        torch.manual_seed(args.seed)
        model = minift.lora_wrap(copy.deepcopy(after_task[setting]), r=args.rank, alpha=args.alpha,
                                 modules_to_save=SAVED if arm["save"] else None)
        stage2 = run_stage(model, data["extend"], args, "lora", args.steps, args.batch, args.lr2, arm["s2"])
        result = grid(model, tokenizer, args)
        entry = {"recipe": {"extend_context": args.rope if arm["extend"] else None,
                            "lora_rank": args.rank, "s2_attention": arm["s2"],
                            "s2_group_size": args.group_size if arm["s2"] else None,
                            "modules_to_save": SAVED if arm["save"] else None},
                 "stage1": setting, "stage2_extend_to_4L": stage2,
                 "heldout_loss_4x_before": out["after_task"][setting]["heldout_loss_4x"],
                 "heldout_loss_4x_after": heldout_losses(model, data),
                 "accuracy_after": per_length(result, args), "passkey_after": result.as_dict(),
                 "arm_seconds": round(time.perf_counter() - t0, 1)}
        out["arms"][name] = entry
        loss = ", ".join(f"{k} {entry['heldout_loss_4x_before'][k]:.3f} -> {v:.3f}"
                         for k, v in entry["heldout_loss_4x_after"].items())
        print(report(f"{name} after stage 2", entry["accuracy_after"]) +
              f"; held-out loss at 4L: {loss}; stage 2 {stage2['seconds']:.0f} s", flush=True)
        if name == "full" and args.png:
            result.save_png(args.png)
        write()


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(HERE / "base"))
    p.add_argument("--out", default="long_context_passkey.json", help="the JSON of every number")
    p.add_argument("--png", default=None, help="the full recipe's passkey heatmap after training")
    p.add_argument("--steps", type=int, default=None, help="stage 2: optimizer steps up to 4L per arm (300)")
    p.add_argument("--task-steps", type=int, default=None,
                   help="stage 1: optimizer steps at L per RoPE setting (2000)")
    p.add_argument("--quick", action="store_true", help="a short run: few steps, rows and trials")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--trained-length", type=int, default=TRAINED_LENGTH)
    p.add_argument("--rope", default="yarn", choices=["yarn", "linear"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="stage 1 (full fine-tuning) learning rate")
    p.add_argument("--lr2", type=float, default=1e-3, help="stage 2 (LoRA) learning rate")
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--task-batch", type=int, default=16, help="stage 1 micro-batch")
    p.add_argument("--batch", type=int, default=8, help="stage 2 micro-batch")
    p.add_argument("--group-size", type=int, default=None, help="S²-Attn group (default L = 4L / 4)")
    p.add_argument("--near", type=int, default=None,
                   help="stage 2 needles within about this many tokens before the question "
                        "(default half the S²-Attn group)")
    p.add_argument("--digits", type=int, default=4)
    p.add_argument("--text-share", type=float, default=0.1, help="stage 1 prose rows per passkey row")
    p.add_argument("--text-share2", type=float, default=0.1, help="stage 2 prose rows per passkey row")
    p.add_argument("--trials", type=int, default=6, help="passkey trials per length x depth")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--seed", type=int, default=0, help="training seed (keys, data order, init)")
    p.add_argument("--eval-seed", type=int, default=1234, help="passkey_grid's seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine 2 threads ran 5-20x slower)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.task_steps = args.steps or 6, args.task_steps or 6
        args.trials, args.depths = 2, "0,1"
    args.steps = 300 if args.steps is None else args.steps
    args.task_steps = 2000 if args.task_steps is None else args.task_steps
    args.depths = [float(d) for d in args.depths.split(",")]
    args.group_size = args.group_size or args.trained_length
    args.near = args.group_size // 2 if args.near is None else args.near
    args.lengths = [args.trained_length * k for k in (1, 2, 4)]
    if not 2 <= args.digits <= 6:
        p.error(f"--digits must be 2..6, got {args.digits}")
    args.arm_names = [a for a in args.arms.split(",") if a]
    if unknown := [a for a in args.arm_names if a not in ARMS]:
        p.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = Path(args.base)
    tokenizer = minift.load_tokenizer(base)
    args.answer_length = len(answer_ids(tokenizer, "1" * args.digits))  # " ", the digits, "."
    out = {"machine": machine_info(), "git_commit": git_commit(), "git_modified": git_modified(),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "setup": {k: v for k, v in vars(args).items() if k not in ("out", "png", "base", "arms")},
           "prompt_texts": TEXTS, "before": {}, "after_task": {}, "arms": {}}

    def write():
        out["seconds_so_far"] = round(time.perf_counter() - started, 1)
        write_json(args.out, out)

    # before: the base as it is, and extended, untrained
    result = grid(load_base(base, args.trained_length), tokenizer, args)
    eval_keys = {t.key for t in result.trials}
    out["before"]["base"] = {"accuracy": per_length(result, args), "passkey": result.as_dict()}
    result = grid(extended_base(base, True, args), tokenizer, args)
    assert {t.key for t in result.trials} == eval_keys  # the same seed: the same prompts
    out["before"]["extended"] = {"accuracy": per_length(result, args), "passkey": result.as_dict()}
    print(report("before: base", out["before"]["base"]["accuracy"]) + "; " +
          report(f"base + extend_context({args.rope})", out["before"]["extended"]["accuracy"]) +
          f" ({len(eval_keys)} keys)", flush=True)

    data, train_keys = datasets(tokenizer, eval_keys, args)
    out["data"] = {name: len(rows) for name, rows in data.items()}
    out["data"].update(eval_keys=len(eval_keys), train_keys=len(train_keys),
                       eval_keys_in_training=len(eval_keys & train_keys))
    run_arms(args.arm_names, base, tokenizer, data, args, out, write)
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    write()
    print(f"total {out['total_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
