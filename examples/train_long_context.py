"""Extend the shipped base to 4x the length it was trained on, and measure passkey retrieval.

`examples/base` was pretrained on windows of 64 tokens (`examples/make_base.py --seq-len`; its
config.json says 512, what its RoPE would allow, not what it saw). This example takes 64 as its
trained length L and fine-tunes it for 4L = 256 tokens with LongLoRA's recipe:

    minift.extend_context (yarn)  +  LoRA  +  S²-Attn while training at 4L
                                  +  trainable embedding and norms (modules_to_save)

The base has never seen a pass key (it scores 0 at every length), so the fine-tuning data teaches
the task as well: passkey prompts built by `minift.evaluation.passkey.passkey_prompt`, the
evaluation's own machinery, followed by the answer and a full stop, with the key at a uniform
random depth; mixed with windows of the base's own kind of prose (`make_base.prose_document`,
every token trained). Two `minift.train` runs, both with the arm's model and recipe:

1. the task at the trained length: rows of exactly L tokens (`--task-steps`, full attention;
   S²-Attn is for the longer rows);
2. the extension: passkey rows of L..4L tokens and prose rows of 4L (`--steps`), S²-Attn on in
   the arms that use it.

Training keys come from another random stream than the evaluation's (`--seed` vs `--eval-seed`),
and every key the evaluation uses is left out of the training rows (the JSON records the check),
so no evaluated key is ever trained on (with 2 digits, about 35 of the 90 keys are evaluated and
the other 55 trained on). Passkey accuracy (`passkey_grid`, greedy generation) at
L, 2L and 4L is printed for the base, for the extended base before training, and after training
for each arm, with the loss at 4L (full attention) of held-out passkey answers (evaluation keys:
never trained on) and of held-out prose:

* full: extend_context + LoRA + S²-Attn + modules_to_save=["embed_tokens", "norm"]
* no_s2: the same with full attention while training
* no_modules_to_save: the same with LoRA adapters only
* no_extend: the same without extend_context (RoPE unscaled)

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
def passkey_rows(tokenizer, count: int, lengths: tuple, keys: list, rng: random.Random,
                 labels: str) -> tuple[list, set]:
    """`count` passkey prompts, each followed by " <key>." and exactly a length drawn from
    `lengths` (an inclusive range) in all, with a key drawn from `keys` at a uniform random depth.
    labels: "answer" trains the answer tokens only, "all" every token. Also the keys used."""
    rows, used = [], set()
    for _ in range(count):
        key = rng.choice(keys)
        answer = tokenizer.encode(" " + key + ".")
        p = passkey_prompt(tokenizer, rng.randint(*lengths) - len(answer), rng.random(), key, **TEXTS)
        trained = p.ids + answer if labels == "all" else [IGNORE_INDEX] * len(p.ids) + answer
        rows.append({"input_ids": p.ids + answer, "labels": trained})
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
    """The rows of both stages (keys: every key of `args.digits` digits but the evaluation's) and
    held-out rows at 4L (keys: the evaluation's, so none was trained on); and the keys trained on."""
    every = [str(k) for k in range(10 ** (args.digits - 1), 10 ** args.digits)]
    train_keys = [k for k in every if k not in eval_keys]
    if len(train_keys) < len(eval_keys):
        raise ValueError(f"{len(eval_keys)} of the {len(every)} keys of {args.digits} digits are "
                         "evaluation keys, too few are left to train on: use more --digits or fewer --trials")
    short, long = args.trained_length, 4 * args.trained_length
    n_text = round(args.rows * args.text_share)
    rng = random.Random(args.seed + 1)
    task, used1 = passkey_rows(tokenizer, args.rows, (short, short), train_keys, rng, args.labels)
    ext, used2 = passkey_rows(tokenizer, args.rows, (short, long), train_keys, rng, args.labels)
    held, _ = passkey_rows(tokenizer, 32, (long, long), sorted(eval_keys), random.Random(args.seed + 2),
                        "answer")
    return {"task": task + text_rows(tokenizer, n_text, short, args.seed + 100),
            "extend": ext + text_rows(tokenizer, n_text, long, args.seed + 200),
            "heldout_answers_4x": held, "heldout_text_4x": text_rows(tokenizer, 8, long, args.seed + 300)
            }, used1 | used2


# ---- models and runs ---------------------------------------------------------------------
def load_base(base: Path, trained_length: int):
    model = minift.load_model(base, dtype=torch.float32)
    # what the base was trained on, so that extend_context's factor is (new length) / (trained length)
    model.config.max_position_embeddings = trained_length
    return model


def prepare(base: Path, arm: dict, args):
    model = load_base(base, args.trained_length)
    if arm["extend"]:
        minift.extend_context(model, 4 * args.trained_length, method=args.rope)
    else:
        model.config.max_position_embeddings = 4 * args.trained_length  # RoPE unscaled
    return minift.lora_wrap(model, r=args.rank, alpha=args.alpha,
                            modules_to_save=SAVED if arm["save"] else None)


def grid(model, tokenizer, args):
    return passkey_grid(model, tokenizer, args.lengths, args.depths, args.trials, args.eval_seed,
                        digits=args.digits, batch_size=50, **TEXTS)


def per_length(result) -> dict:
    return {str(n): float(row.mean()) for n, row in zip(result.lengths, result.accuracy)}


def run_stage(model, rows, args, steps: int, batch: int, lr: float, s2: bool) -> dict:
    """One `minift.train` run; its per-step losses and seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        config = minift.TrainConfig(
            method="lora", learning_rate=lr, warmup_ratio=args.warmup, micro_batch_size=batch,
            max_steps=steps, bf16=False, progress=False, output_dir=tmp, seed=args.seed, device="cpu",
            s2_attention=s2, s2_group_size=args.group_size if s2 else None)
        started = time.perf_counter()
        minift.train(model, rows, config)
        seconds = time.perf_counter() - started
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    return {"steps": steps, "micro_batch_size": batch, "learning_rate": lr, "s2_attention": s2,
            "seconds": round(seconds, 1), "losses": [round(json.loads(x)["loss"], 4) for x in lines]}


def heldout_losses(model, data) -> dict:
    """Mean token loss at 4L (full attention): the answers (" <key>.") of 32 passkey rows whose
    keys are evaluation keys (so none was trained on), and 8 prose windows."""
    config = minift.TrainConfig(method="lora", bf16=False, progress=False, micro_batch_size=8)
    return {name: round(evaluate(model, data[f"heldout_{name}_4x"], config, "cpu")["eval_loss"], 4)
            for name in ("answers", "text")}


def run_arms(names, base, tokenizer, data, args, out, write) -> None:
    """Train and evaluate each arm; arms that differ only in S²-Attn share stage 1 (the task at
    L uses full attention in every arm)."""
    after_task = {}  # (extend, save) -> the model after stage 1 and that stage's record
    for name in names:
        arm, t0 = ARMS[name], time.perf_counter()
        shared = (arm["extend"], arm["save"])
        if shared not in after_task:
            torch.manual_seed(args.seed)
            model = prepare(base, arm, args)
            before = heldout_losses(model, data)
            stage1 = run_stage(model, data["task"], args, args.task_steps, args.task_batch, args.lr, False)
            after_task[shared] = (model, before, stage1)
        model, before, stage1 = after_task[shared]
        model = copy.deepcopy(model)
        stage2 = run_stage(model, data["extend"], args, args.steps, args.batch, args.lr2, arm["s2"])
        result = grid(model, tokenizer, args)
        entry = {"recipe": {"extend_context": args.rope if arm["extend"] else None,
                            "lora_rank": args.rank, "s2_attention": arm["s2"],
                            "s2_group_size": args.group_size if arm["s2"] else None,
                            "modules_to_save": SAVED if arm["save"] else None},
                 "stage1_task_at_L": stage1, "stage2_extend_to_4L": stage2,
                 "heldout_loss_4x_before": before, "heldout_loss_4x_after": heldout_losses(model, data),
                 "accuracy_after": per_length(result), "passkey_after": result.as_dict(),
                 "arm_seconds": round(time.perf_counter() - t0, 1)}
        out["arms"][name] = entry
        acc = ", ".join(f"{n}: {a:.2f}" for n, a in entry["accuracy_after"].items())
        loss = ", ".join(f"{k} {entry['heldout_loss_4x_before'][k]:.3f} -> {v:.3f}"
                         for k, v in entry["heldout_loss_4x_after"].items())
        print(f"{name}: passkey after {{{acc}}}; held-out loss at 4L: {loss}; "
              f"train {stage1['seconds']:.0f} s + {stage2['seconds']:.0f} s", flush=True)
        if name == "full" and args.png:
            result.save_png(args.png)
        write()


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(HERE / "base"))
    p.add_argument("--out", default="long_context_passkey.json", help="the JSON of every number")
    p.add_argument("--png", default=None, help="the full recipe's passkey heatmap after training")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps at L..4L per arm (150)")
    p.add_argument("--task-steps", type=int, default=None, help="optimizer steps at L per arm (400)")
    p.add_argument("--quick", action="store_true", help="a short run: few steps, rows and trials")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--trained-length", type=int, default=TRAINED_LENGTH)
    p.add_argument("--rope", default="yarn", choices=["yarn", "linear"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=3e-3, help="learning rate at L")
    p.add_argument("--lr2", type=float, default=2e-3, help="learning rate at L..4L")
    p.add_argument("--warmup", type=float, default=0.05)
    p.add_argument("--task-batch", type=int, default=16, help="micro-batch at L")
    p.add_argument("--batch", type=int, default=8, help="micro-batch at L..4L")
    p.add_argument("--group-size", type=int, default=None, help="S²-Attn group (default L = 4L / 4)")
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--rows", type=int, default=4000, help="passkey rows per stage")
    p.add_argument("--text-share", type=float, default=0.25, help="prose rows per passkey row")
    p.add_argument("--labels", default="answer", choices=["answer", "all"])
    p.add_argument("--trials", type=int, default=3, help="passkey trials per length x depth")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--seed", type=int, default=0, help="training seed (keys, data order, init)")
    p.add_argument("--eval-seed", type=int, default=1234, help="passkey_grid's seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: on a shared 2-core machine 2 threads ran 5-20x slower)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.task_steps = args.steps or 6, args.task_steps or 6
        args.rows, args.trials, args.depths = 64, 2, "0,1"
    args.steps = 150 if args.steps is None else args.steps
    args.task_steps = 400 if args.task_steps is None else args.task_steps
    args.depths = [float(d) for d in args.depths.split(",")]
    args.group_size = args.group_size or args.trained_length
    args.lengths = [args.trained_length * k for k in (1, 2, 4)]
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
    out = {"machine": machine_info(), "git_commit": git_commit(), "git_modified": git_modified(),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "setup": {k: v for k, v in vars(args).items() if k not in ("out", "png", "base", "arms")},
           "prompt_texts": TEXTS, "before": {}, "arms": {}}

    def write():
        out["seconds_so_far"] = round(time.perf_counter() - started, 1)
        write_json(args.out, out)

    # before: the base as it is, and extended, untrained
    result = grid(load_base(base, args.trained_length), tokenizer, args)
    eval_keys = {t.key for t in result.trials}
    out["before"]["base"] = {"accuracy": per_length(result), "passkey": result.as_dict()}
    extended = minift.extend_context(load_base(base, args.trained_length), 4 * args.trained_length,
                                     method=args.rope)
    result = grid(extended, tokenizer, args)
    assert {t.key for t in result.trials} == eval_keys  # the same seed: the same prompts
    out["before"]["extended"] = {"accuracy": per_length(result), "passkey": result.as_dict()}
    print(f"before: base {out['before']['base']['accuracy']}, base + extend_context({args.rope}) "
          f"{out['before']['extended']['accuracy']} ({len(eval_keys)} keys)", flush=True)

    data, train_keys = datasets(tokenizer, eval_keys, args)
    out["data"] = {name: len(rows) for name, rows in data.items()}
    out["data"].update(labels=args.labels, eval_keys=len(eval_keys), train_keys=len(train_keys),
                       eval_keys_in_training=len(eval_keys & train_keys))
    run_arms(args.arm_names, base, tokenizer, data, args, out, write)
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    write()
    print(f"total {out['total_seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
