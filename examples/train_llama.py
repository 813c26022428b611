"""Fine-tune a Llama-family checkpoint on a chat JSONL file: full, LoRA or QLoRA.

    python examples/train_llama.py                      # LoRA on the shipped base and data
    python examples/train_llama.py --method qlora --merge
    python examples/train_llama.py --model path/to/hf-checkpoint --data my.jsonl --eval-data held.jsonl
    torchrun --nproc_per_node 2 examples/train_llama.py --method qlora    # FSDP over 2 processes

It evaluates the held-out split before and after training (exact match, token F1 and ROUGE-L of
greedy replies, the loss on the replies, and the perplexity of general text, whose rise measures
forgetting), trains with minift.train, prints both evaluations side by side and saves what was
trained: the adapter (PEFT format) for LoRA/QLoRA, the whole model for full fine-tuning, and
with --merge the merged model in Hugging Face format, after comparing its logits with the
adapter model's on held-out samples. Bad input ends the run with one line on stderr and exit
code 2. Under torchrun every rank trains its share of each step (the flags give the global
batch); rank 0 alone prints and writes the outputs, errors included (every rank exits with 2).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

import minift

if not hasattr(minift, "load_model"):
    # A folder named minift/ without __init__.py, earlier on Python's path than the package (the
    # script's own folder comes first), is imported as a namespace package in the package's
    # place; with `pip install -e` that happens even though minift is installed.
    if os.environ.get("RANK", "0") == "0":
        found = ", ".join(getattr(minift, "__path__", None) or [str(minift.__file__)])
        print(f"{Path(sys.argv[0]).name}: error: `import minift` found the folder {found}, not the "
              f"minift package: a folder named minift on Python's path (beside the script, or in "
              f"the current directory) takes its place; rename or move that folder, or run the "
              f"script from another folder (docs/training.md, 'Where the script runs')",
              file=sys.stderr)
    sys.exit(2)

from minift.checkpoints import steps as ckpt
from minift.cli import ShowDefaults
from minift.data.sft import load_dataset, load_jsonl, row_to_messages
from minift.distributed import checkpoint as dckpt
from minift.distributed import parallel as mdist
from minift.evaluation.forgetting import forgetting, load_texts, perplexity
from minift.evaluation.metrics import task_metrics
from minift.files import WriteError, is_disk_full, reporting_write_errors, write_json
from minift.lora.layer import find_targets, lora_state_dict
from minift.lora.merging import describe, merge_and_check
from minift.models.loading import as_dtype
from minift.names import METHODS, OPTIMIZERS, PARALLEL
from minift.objectives.sft import evaluate
from minift.optim.paging import DEFAULT_DEVICE_BUDGET
from minift.sizes import parse_bytes
from minift.training import rundir
from minift.training.config import TrainConfig
from minift.training.loop import tidy

HERE = Path(__file__).resolve().parent
DEFAULT_LR = {"full": 1e-3, "lora": 3e-3, "qlora": 3e-3}
DTYPES = ("auto", "float32", "bfloat16", "float16")
USAGE_ERROR_WAIT_S = 3.0  # how long ranks other than 0 wait before exiting on a usage error (a choice)
NO_CUT = 2**62  # rows are tokenized whole: one longer than --seq-len is refused, never cut


class UsageError(Exception):
    """Bad input found by this script: reported as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _number(kind, minimum, strict=False, maximum=None):
    """argparse type: a finite number of `kind`, >= minimum (> minimum when strict), < maximum."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        # float() accepts "inf" and "nan"; nan fails no comparison below, inf passes "> 0".
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, got {text}")
        if maximum is not None and value >= maximum:
            raise argparse.ArgumentTypeError(f"must be < {maximum}, got {text}")
        return value
    return parse


def _budget(text):
    """argparse type of --paged-device-budget: a byte size ("512MiB", "2GB", "0") or "all"."""
    if text.strip().lower() == "all":
        return "all"
    if text.strip() == "0":
        return 0
    try:
        return parse_bytes(text, "size", allow_zero=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("size: ")) from None


def _device(text):
    """argparse type: a device that exists on this machine (checked before any work)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected cpu, cuda, cuda:N, "
                                         f"mps, ...") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError("the meta device holds no data; use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} "
                                             f"CUDA device(s)")
        return text
    try:  # other backends (mps, xpu, ...): the cheapest test of being usable is to use it
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise argparse.ArgumentTypeError(f"{text} is not usable on this machine ({first})") from None
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="train_llama.py", description=__doc__.split("\n\n")[0],
                      formatter_class=ShowDefaults)
    add = p.add_argument
    add("--model", default=str(HERE / "base"), help="Hugging Face checkpoint folder")
    add("--data", default=str(HERE / "data" / "train.jsonl"), help="training chat JSONL")
    add("--eval-data", default=str(HERE / "data" / "eval.jsonl"), help="held-out chat JSONL")
    add("--method", default="lora", choices=METHODS, help="what is trained")
    add("--r", type=_number(int, 1), default=8, help="LoRA rank")
    add("--alpha", type=_number(float, 0, strict=True), default=16.0, help="LoRA alpha")
    add("--adapter-dtype", default="float32", choices=("float32", "bfloat16"),
        help="dtype of the LoRA weights (their gradients and 32-bit optimizer states follow it)")
    add("--quantize-lm-head", action="store_true",
        help="with --method qlora: store lm_head in NF4 too (default: it stays in --dtype)")
    add("--target-modules", default="all-linear",
        help="'all-linear' or comma-separated module names, e.g. q_proj,v_proj")
    add("--modules-to-save", default="",
        help="lora/qlora: comma-separated module-name suffixes trained whole beside the adapters "
             "and saved in the adapter (PEFT's modules_to_save), e.g. embed_tokens,norm (LongLoRA's "
             "trainable embeddings and norms; 'norm' matches every *norm module, as in PEFT)")
    add("--lr", type=_number(float, 0, strict=True), default=None,
        help="peak learning rate (default: 1e-3 full, 3e-3 lora/qlora)")
    add("--max-steps", type=_number(int, 1), default=None, help="optimizer steps (overrides --epochs)")
    add("--epochs", type=_number(int, 1), default=8, help="passes over --data")
    add("--seq-len", type=_number(int, 2), default=64, help="longest example in tokens")
    add("--batch-size", type=_number(int, 1), default=16, help="examples per micro-batch")
    add("--grad-accum", type=_number(int, 1), default=1, help="micro-batches per optimizer step")
    add("--optimizer", default="adamw", choices=OPTIMIZERS, help="optimizer of the trained weights")
    add("--dtype", default="auto", choices=DTYPES,
        help="dtype the base is loaded and trained in; auto: on CUDA the checkpoint's own dtype "
             "(bf16 autocast), on CPU float32, measured fastest there (docs/training.md). Saved "
             "models keep the checkpoint's dtype either way")
    add("--gradient-checkpointing", action="store_true", help="recompute each layer in backward")
    add("--max-grad-norm", type=_number(float, 0), default=1.0,
        help="clip the global gradient norm to this; 0 = no clipping")
    add("--loss-chunk-size", type=_number(int, 0), default=1024,
        help="tokens per chunk of the lm_head + loss; 0 = full logits")
    add("--activation-offload", action="store_true",
        help="keep checkpointed layer inputs in host memory (with --gradient-checkpointing)")
    add("--optimizer-in-backward", action="store_true",
        help="step each parameter in backward and free its gradient (with --max-grad-norm 0)")
    add("--mlp-tile-size", type=_number(int, 1), default=None,
        help="tokens per MLP tile for long sequences: each layer's MLP runs over checkpointed "
             "tiles of the sequence (default: the whole sequence at once)")
    add("--s2-attention", action="store_true",
        help="shifted sparse attention (S²-Attn, LongLoRA) while training: half the heads attend "
             "within groups of tokens, the other half within groups shifted by half a group; "
             "evaluation and generation attend fully (docs/long_context.md)")
    add("--s2-group-size", type=_number(int, 2), default=None, metavar="N",
        help="with --s2-attention: tokens per group (default: a quarter of each micro-batch's length)")
    add("--no-group-by-length", dest="group_by_length", action="store_false",
        help="random micro-batches instead of rows of similar length together (more padding)")
    add("--paged-device-budget", type=_budget, default=None, metavar="SIZE",
        help="with --optimizer paged_adamw8bit: device memory for the 8-bit state pages, e.g. "
             "512MiB or 2GB; the rest streams from host memory each step; 0 = stream every page, "
             "all = keep every page (default: 1GiB)")
    add("--output", default="runs/train_llama", help="output folder")
    add("--save-interval", type=_number(int, 1), default=100,
        help="write a checkpoint every N steps (and at the end), for --resume")
    add("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
        help="resume from the newest checkpoint in --output, or from CHECKPOINT")
    add("--skip-step", type=_number(int, 1), action="append", default=[], metavar="N",
        help="pass over step N's micro-batches untrained (a batch that gave NaN); repeatable, "
             "kept on --resume")
    add("--merge", action="store_true", help="also save the merged model in Hugging Face format")
    add("--merge-into", default="nf4", choices=("nf4", "original"),
        help="qlora --merge: fold the adapter into the dequantized 4-bit weights it was trained "
             "on (nf4) or into the original 16-bit weights of --model (original)")
    add("--general", default=str(HERE / "data" / "general.jsonl"),
        help="plain-text JSONL ({\"text\": ...}) whose perplexity tracks forgetting; '' = off")
    add("--seed", type=_number(int, 0, maximum=2**32), default=0, help="seeds init, dropout and data order")
    add("--eval-samples", type=_number(int, 1), default=None,
        help="evaluate on the first N held-out rows (default: all)")
    add("--device", type=_device, default=None, help="cpu, cuda, ... (default: cuda when available)")
    add_torchrun_arguments(add)
    return with_launch(p.parse_args(argv))


def add_torchrun_arguments(add) -> None:
    """--parallel and --fsdp-cpu-offload (examples/train_dpo.py has them too)."""
    add("--parallel", choices=PARALLEL, default=None,
        help="under torchrun: fsdp (default with more than one process) or ddp")
    add("--fsdp-cpu-offload", action="store_true",
        help="FSDP: sharded parameters, gradients and optimizer states in host memory")
    add("--dist-timeout", type=_number(float, 0, strict=True), default=1800.0, metavar="SECONDS",
        help="under torchrun: how long a collective waits for the other ranks before the job fails")


def with_launch(args: argparse.Namespace) -> argparse.Namespace:
    """``args.distributed``: a torchrun launch, or --parallel asked for one (refused later when
    not launched)."""
    args.distributed = args.parallel is not None or mdist.env_world_size() > 1
    return args


# ---- loading -----------------------------------------------------------------------------
def load_base(args, device):
    """The tokenizer and the prepared model: full, LoRA-wrapped, or NF4 + LoRA-wrapped."""
    path = Path(args.model)
    try:
        model = minift.load_model(path, dtype=compute_dtype(args, path, device), device=device,
                                  quantize="nf4" if args.method == "qlora" else None)
        tokenizer = minift.load_tokenizer(path)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise UsageError(f"--model {path} is not a usable checkpoint: {err}") from err
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"--model {path}: tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"only {model.config.vocab_size}")
    if args.quantize_lm_head:
        if args.method != "qlora":
            raise UsageError("--quantize-lm-head stores lm_head in NF4: it needs --method qlora")
        if model.config.tie_word_embeddings:
            raise UsageError("--quantize-lm-head: this model ties lm_head to the embedding, which "
                             "stays trainable-shaped; leave lm_head as it is")
        minift.quantize_model(model, skip=())  # the decoder's linears are NF4 already
    saved = [t.strip() for t in args.modules_to_save.split(",") if t.strip()] or None
    if args.method == "full":
        if saved:
            raise UsageError("--modules-to-save: --method full trains every module already; it "
                             "applies to lora and qlora")
        model.requires_grad_(True)
        return tokenizer, model
    targets = args.target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    try:
        check_rank(model, args.r, targets)
        find_targets(model, targets)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--target-modules {args.target_modules!r}: {err}") from err
    try:
        model = minift.lora_wrap(model, r=args.r, alpha=args.alpha, target_modules=targets,
                                 adapter_dtype=getattr(torch, args.adapter_dtype), modules_to_save=saved)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--modules-to-save {args.modules_to_save!r}: {err}") from err
    return tokenizer, model


def check_rank(model, r, targets="all-linear", say=print) -> None:
    """--r against the layers it adapts: B @ A of an (out, in) weight has rank at most
    min(in, out), so a larger r only adds parameters. Refused when no adapted layer can use it,
    a note when some cannot; checked before lora_wrap allocates anything."""
    modules = dict(model.named_modules())
    sizes = {name: (modules[name].in_features, modules[name].out_features)
             for name in find_targets(model, targets)}
    if not sizes:
        return
    widest = max(sizes, key=lambda n: min(sizes[n]))
    if r > min(sizes[widest]):
        i, o = sizes[widest]
        raise UsageError(f"--r {r} is more than the dimensions of every adapted layer (the largest, "
                         f"{widest}, has {i} in, {o} out): an update B @ A of such a weight has rank "
                         f"at most {min(i, o)}, and more only adds parameters; use --r {min(i, o)} "
                         f"or less")
    small = [n for n in sizes if r > min(sizes[n])]
    if small and mdist.is_main():
        i, o = sizes[small[0]]
        say(f"note: --r {r} is more than the dimensions of {len(small)} of the {len(sizes)} adapted "
            f"layers (e.g. {small[0]}: {i} in, {o} out); their updates have rank at most "
            f"{min(min(sizes[n]) for n in small)}")


def checkpoint_dtype(path) -> torch.dtype:
    """The dtype the checkpoint's config.json declares (float32 when it declares none)."""
    try:
        declared = minift.ModelConfig.from_json(path).torch_dtype
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(f"--model {path} is not a usable checkpoint: {err}") from err
    try:
        return as_dtype(declared or "float32")
    except ValueError:
        return torch.float32


def compute_dtype(args, path, device) -> torch.dtype:
    """--dtype: auto keeps the checkpoint's dtype on CUDA; on CPU float32 (bf16 measured slower)."""
    if args.dtype != "auto":
        return getattr(torch, args.dtype)
    return checkpoint_dtype(path) if device.type == "cuda" else torch.float32


def load_rows(flag, path, tokenizer, seq_len, limit=None, positions=None):
    """(raw rows, tokenized examples) of a chat JSONL file; errors name the flag and line.
    `positions`: the model's max_position_embeddings, which no row may exceed."""
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        rows = load_jsonl(path)
        with warnings.catch_warnings(record=True) as caught:  # dropped rows: reported below
            warnings.simplefilter("always")
            examples, stats = load_dataset(path, tokenizer, NO_CUT)
    except (ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{flag}: {err}") from err
    if stats.dropped:  # a row without an assistant reply: nothing to train or score
        raise UsageError(f"{flag}: {caught[-1].message if caught else f'{stats.dropped} row(s) dropped'}")
    check_lengths(flag, path, [len(ex["input_ids"]) for ex in examples], stats.longest,
                  stats.longest_line, seq_len, positions)
    # every chat row shape (chat, ShareGPT, alpaca, prompt/completion) as messages, for exact
    # match; raw text rows are trained on but have no reply to match
    conversations = [{"messages": row_to_messages(row)} for row in rows[:limit]
                     if not (flag == "--data" and set(row) == {"text"})]
    for i, conversation in enumerate(conversations):
        if conversation["messages"][-1]["role"] != "assistant":
            raise UsageError(f"{flag} {path}: row {i + 1} does not end with an assistant reply")
    return conversations, examples[:limit]


def check_lengths(flag, path, lengths, longest, line, seq_len, positions=None, what="row") -> None:
    """Every row within --seq-len, and --seq-len within the model's positions; one line naming
    --seq-len, the longest row (its line and length) and max_position_embeddings otherwise."""
    if positions is not None and seq_len > positions:
        beyond = (f"; {flag} {path}:{line} has a {what} of {longest} tokens, which the model cannot "
                  f"take at any --seq-len: shorten it or leave it out" if longest > positions else "")
        raise UsageError(f"--seq-len {seq_len} is more than the model's max_position_embeddings "
                         f"{positions} (it has no positions past that); use --seq-len {positions} "
                         f"or less{beyond}")
    over = sum(n > seq_len for n in lengths)
    if not over:
        return
    if positions is not None and longest > positions:
        fix = (f"the model's max_position_embeddings is {positions}, so no --seq-len takes the "
               f"{what}s longer than that: shorten them or leave them out")
    else:
        fix = f"raise --seq-len to {longest}"
    raise UsageError(f"{flag} {path}: {over} {what}(s) longer than --seq-len {seq_len} tokens (the "
                     f"longest, line {line}, has {longest}); {fix}")


def check_batches(args, n_train, what="examples", say=print) -> None:
    """Notes (not errors) when --batch-size or --grad-accum asks for more than --data has: a
    micro-batch holds at most every example, and a step never spans two epochs."""
    if args.batch_size > n_train:
        say(f"note: --batch-size {args.batch_size} is more than the {n_train} {what} of --data: "
            f"each micro-batch holds all {n_train}")
    per_epoch = -(-n_train // args.batch_size)  # micro-batches of an epoch
    grad_accum = getattr(args, "grad_accum", 1)
    if grad_accum > per_epoch:
        steps = args.max_steps or args.epochs
        say(f"note: --grad-accum {grad_accum} is more than the {per_epoch} micro-batch(es) of an "
            f"epoch ({n_train} {what} of --data, --batch-size {min(args.batch_size, n_train)}), "
            f"and a step never spans two epochs: each step takes one epoch, {per_epoch} "
            f"micro-batch(es), so the run has {steps} optimizer step(s)")


def check_resume(model, config, train_data, say=print):
    """Fail before any work when --resume points at a checkpoint of another method, model shape,
    base model, data order or training data (minift.train checks the same, but only once it
    runs, after the before-evaluation)."""
    try:  # a fresh run into a folder with another run's checkpoints, refused before any work
        tidy(config.output_dir)  # a complete .tmp-step-N counts as a checkpoint (rank 0 tidies)
        rundir.check_output_dir(config.output_dir, config.resume_from)
    except ValueError as err:
        raise UsageError(f"--output: {in_flags(str(err))}") from err
    try:
        path = minift.check_resume(config, model, train_data)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise UsageError(f"--resume: {in_flags(str(err))}") from err
    if path is not None:
        say(f"resuming from {path} (step {ckpt.read_trainer_state(path).get('step')})")


# ---- evaluation --------------------------------------------------------------------------
def replies(model, tokenizer, rows, device, batch_size=64):
    """Greedy replies to the conversation of each row minus its last (assistant) message."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True,
                                                 tokenize=True) for r in chunk]
        longest = max(len(tokenizer.encode(r["messages"][-1]["content"])) for r in chunk)
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        gen = minift.generate(model, ids, max_new_tokens=longest + 4, attention_mask=mask,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        out += [tokenizer.decode(row[width:]).strip() for row in gen]
    return out


def evaluate_all(model, tokenizer, rows, examples, config, device, general=None) -> dict:
    """Exact match, token F1 and ROUGE-L of greedy replies, mean loss on the reply tokens, and
    the perplexity of general text (what the model knew before; for forgetting)."""
    got = replies(model, tokenizer, rows, device)
    want = [r["messages"][-1]["content"].strip() for r in rows]
    hits = sum(g == w for g, w in zip(got, want))
    loss = evaluate(model, examples, config, device)["eval_loss"]
    task = task_metrics(got, want)
    out = {"exact_match": hits / len(rows), "correct": hits, "total": len(rows),
           "token_f1": task["token_f1"], "rouge_l": task["rouge_l"], "eval_loss": loss,
           "samples": [{"want": w, "got": g} for w, g in zip(want[:3], got[:3])]}
    if general:
        out["general"] = perplexity(model, tokenizer, general, device, bf16=config.bf16,
                                    loss_chunk_size=config.loss_chunk_size)
    return out


def original_perplexity(args, tokenizer, general, config, device) -> dict:
    """General-text perplexity of the unquantized base (loaded for it, then freed)."""
    path, device = Path(args.model), torch.device(device)
    original = minift.load_model(path, dtype=compute_dtype(args, path, device), device=device)
    try:
        return perplexity(original, tokenizer, general, device, bf16=config.bf16,
                          loss_chunk_size=config.loss_chunk_size)
    finally:
        del original


def report(before: dict, after: dict) -> str:
    rows = [("", "before", "after"),
            ("exact match (held-out)", f"{before['correct']}/{before['total']} = {before['exact_match']:.0%}",
             f"{after['correct']}/{after['total']} = {after['exact_match']:.0%}"),
            ("token F1 / ROUGE-L", f"{before['token_f1']:.3f} / {before['rouge_l']:.3f}",
             f"{after['token_f1']:.3f} / {after['rouge_l']:.3f}"),
            ("eval loss (reply tokens)", f"{before['eval_loss']:.4f}", f"{after['eval_loss']:.4f}")]
    if "general" in before:
        label = "general-text perplexity" + (" (NF4)" if "general_original" in before else "")
        rows.append((label, f"{before['general']['perplexity']:.3f}",
                     f"{after['general']['perplexity']:.3f}"))
    if "general_original" in before:
        rows.append(("  original 16-bit base", f"{before['general_original']['perplexity']:.3f}", ""))
    lines = [f"{a:<26}{b:>18}{c:>18}" for a, b, c in rows]
    for key, base in (("general_original", "the original base"), ("general", "the NF4 base")):
        if key not in before:
            continue
        change = forgetting(before[key], after["general"])
        against = f" against {base}" if "general_original" in before else ""
        lines.append(f"general-text perplexity change{against} {change['relative_change']:+.2%} "
                     f"({'within' if change['within_budget'] else 'OVER'} the "
                     f"{change['budget']:.0%} forgetting budget)")
    for i, (b, a) in enumerate(zip(before["samples"], after["samples"])):
        lines.append(f"sample {i + 1}: want {b['want']!r}; before {b['got']!r}; after {a['got']!r}")
    return "\n".join(lines)


# ---- the run -----------------------------------------------------------------------------
# TrainConfig field -> the flag that sets it: errors of TrainConfig and minift.train are told in
# the words of the flags (`--max-grad-norm 0`, not `max_grad_norm=None`) by `in_flags`.
FLAG_OF_FIELD = {"method": "--method", "learning_rate": "--lr", "epochs": "--epochs",
                 "max_steps": "--max-steps", "micro_batch_size": "--batch-size",
                 "grad_accum": "--grad-accum", "optimizer": "--optimizer", "seed": "--seed",
                 "save_interval": "--save-interval", "device": "--device", "output_dir": "--output",
                 "resume_from": "--resume", "max_grad_norm": "--max-grad-norm",
                 "gradient_checkpointing": "--gradient-checkpointing",
                 "loss_chunk_size": "--loss-chunk-size",
                 "activation_offload": "--activation-offload",
                 "optimizer_in_backward": "--optimizer-in-backward", "parallel": "--parallel",
                 "fsdp_cpu_offload": "--fsdp-cpu-offload", "mlp_tile_size": "--mlp-tile-size",
                 "paged_device_budget": "--paged-device-budget", "skip_steps": "--skip-step",
                 "dist_timeout": "--dist-timeout", "s2_attention": "--s2-attention",
                 "s2_group_size": "--s2-group-size", "group_by_length": "--no-group-by-length"}
# fields set by a switch (store_true): field=True is the flag, field=False its absence
SWITCHES = {"gradient_checkpointing", "activation_offload", "optimizer_in_backward",
            "fsdp_cpu_offload", "precompute_reference", "s2_attention"}
# values the flags spell their own way
SPELLED = {("max_grad_norm", "None"): "--max-grad-norm 0",
           ("loss_chunk_size", "None"): "--loss-chunk-size 0",
           ("paged_device_budget", "None"): "--paged-device-budget all",
           ("resume_from", "latest"): "--resume",
           ("group_by_length", "False"): "--no-group-by-length",
           ("group_by_length", "True"): "no --no-group-by-length"}
_FIELD = re.compile(r"(TrainConfig\.)?\b([a-z][a-z0-9_]*)(=(?:'[^']*'|[^\s,;)]+))?( \(--[a-z-]+\))?")


def in_flags(message: str, flags: dict = FLAG_OF_FIELD) -> str:
    """`message` with every `TrainConfig.field` and `field=value` of `flags` written as the flag
    that sets it: "TrainConfig.optimizer_in_backward=True ...; set max_grad_norm=None" becomes
    "--optimizer-in-backward ...; set --max-grad-norm 0". Bare words ("method") stay."""
    def spell(match):
        prefix, field, value, aside = match.groups()
        if field not in flags or not (prefix or value):
            return match.group(0)
        flag, value = flags[field], value and value[1:].strip("'")
        if not value:
            words = flag
        elif (field, value) in SPELLED:
            words = SPELLED[field, value]
        elif field in SWITCHES:
            words = flag if value == "True" else f"no {flag}"
        else:
            words = f"no {flag}" if value == "None" else f"{flag} {value}"
        return words + (aside if aside and aside[2:-1] != flag else "")
    return _FIELD.sub(spell, message)


def make_config(args, pad_id) -> TrainConfig:
    budget = {None: DEFAULT_DEVICE_BUDGET, "all": None}.get(args.paged_device_budget,
                                                           args.paged_device_budget)
    try:
        return TrainConfig(
            method=args.method, learning_rate=args.lr or DEFAULT_LR[args.method], warmup_ratio=0.05,
            epochs=args.epochs, max_steps=args.max_steps, micro_batch_size=args.batch_size,
            grad_accum=args.grad_accum, bf16=args.device_type == "cuda",
            gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
            max_grad_norm=args.max_grad_norm or None, loss_chunk_size=args.loss_chunk_size or None,
            activation_offload=args.activation_offload,
            optimizer_in_backward=args.optimizer_in_backward, mlp_tile_size=args.mlp_tile_size,
            paged_device_budget=budget, s2_attention=args.s2_attention,
            s2_group_size=args.s2_group_size, group_by_length=args.group_by_length,
            pad_id=pad_id, output_dir=args.output, seed=args.seed, resume_from=args.resume,
            device=args.device, log_interval=10, save_interval=args.save_interval, keep_last=2,
            parallel=args.parallel, fsdp_cpu_offload=args.fsdp_cpu_offload,
            dist_timeout=args.dist_timeout, skip_steps=args.skip_step)
    except ValueError as err:
        raise UsageError(in_flags(str(err))) from err


def check_launch(args) -> None:
    """Flags that need what this launch lacks, refused before any work."""
    if args.distributed and not mdist.launched():
        raise UsageError("--parallel: needs a torchrun launch (torchrun --nproc_per_node N ...)")
    if args.fsdp_cpu_offload and not (args.distributed and args.parallel != "ddp"):
        how = "--parallel ddp shards nothing" if args.parallel == "ddp" else \
            "this is one process: start it with torchrun --nproc_per_node N"
        raise UsageError(f"--fsdp-cpu-offload moves FSDP's shards to host memory, and {how}")


def check_output(path) -> None:
    """--output must be a directory or creatable as one; checked before any work."""
    out = Path(path)
    for existing in (out, *out.parents):
        if existing.exists():
            if not existing.is_dir():
                raise UsageError(f"--output {out}: {existing} exists and is not a directory")
            if not os.access(existing, os.W_OK | os.X_OK):
                raise UsageError(f"--output {out}: {existing} is not writable")
            return


class OutputsNotSaved(Exception):
    """Training finished, but an output could not be written (a full disk): one line, exit 1."""


def writing(path, needed, out):
    """An I/O error while writing the output `path` (an OSError, or safetensors' SafetensorError)
    as one line: the path, the bytes needed and free, and that the run's checkpoints are intact."""
    def then(err):
        newest = ckpt.latest_checkpoint(out)
        fix = "free space" if is_disk_full(err) else "fix the cause"
        done = f"training finished and its checkpoint {newest} is intact" if newest else "training finished"
        return f"{done}; {fix}, then run the same command with --resume to write the outputs"
    return reporting_write_errors(f"cannot write {path}", out, needed, then=then)


def model_bytes(model, dtype) -> int:
    """Bytes of a model's weights saved in `dtype` (tied weights counted twice: an upper bound)."""
    return sum(t.numel() for t in model.state_dict().values()) * dtype.itemsize


def save_outputs(model, tokenizer, args, samples=()) -> dict:
    if args.distributed:
        with writing(Path(args.output), None, Path(args.output)):
            return save_outputs_distributed(model, tokenizer, args)
    out, saved = Path(args.output), {}
    keep = checkpoint_dtype(args.model)  # the saved model has the dtype the checkpoint had
    if args.method == "full":
        with writing(out / "model", model_bytes(model, keep), out):
            minift.save_model(model.to(keep), out / "model")
            tokenizer.save(out / "model")
        saved["model"] = str(out / "model")
        return saved
    adapter_bytes = sum(t.nbytes for t in lora_state_dict(model).values())
    with writing(out / "adapter", adapter_bytes, out):
        minift.save_adapter(model, out / "adapter",
                            base_model_name_or_path=os.path.abspath(args.model))
    saved["adapter"] = str(out / "adapter")
    if args.merge:
        # the merged model is checked against the adapter model on held-out samples first
        base = args.model if args.merge_into == "original" else None
        # the check runs on the merged model in the checkpoint's dtype: what is saved
        merged, check = merge_and_check(model, list(samples), base_weights=base, dtype=keep)
        print(describe(check))
        saved["merge_check"] = check
        with writing(out / "merged", model_bytes(merged, keep), out):
            minift.save_model(merged, out / "merged")
            tokenizer.save(out / "merged")
        saved["merged"] = str(out / "merged")
    return saved


def save_outputs_distributed(model, tokenizer, args) -> dict:
    """Gathered to rank 0 and written once there, in the 1-process formats (every rank calls it)."""
    out, saved = Path(args.output), {}
    if args.method == "full":
        dckpt.export_model(model, out / "model", mdist.unwrap(model).config)
        saved["model"] = str(out / "model")
    else:
        dckpt.export_adapter(model, out / "adapter", base_model_name_or_path=str(args.model))
        saved["adapter"] = str(out / "adapter")
    if mdist.is_main():
        if "model" in saved:
            tokenizer.save(out / "model")
        if args.merge and args.method != "full":
            # the merge needs the whole base: rank 0 reloads it, as a 1-process run holds it
            _, base = load_base(args, torch.device("cpu"))
            merged = minift.merge_lora(minift.load_adapter(base, out / "adapter")).float()
            minift.save_model(merged, out / "merged")
            tokenizer.save(out / "merged")
    if args.merge and args.method != "full":
        saved["merged"] = str(out / "merged")
    mdist.barrier()
    return saved


def load_general(path):
    """The texts of --general ('' = no forgetting check); errors name the flag."""
    if not path:
        return None
    if not Path(path).is_file():
        raise UsageError(f"--general {path}: no such file")
    try:
        return load_texts(path)
    except (ValueError, OSError) as err:
        raise UsageError(f"--general: {err}") from err


def run(args) -> dict:
    # under torchrun: join the process group first, so "cuda" is this rank's GPU from here on
    check_launch(args)
    device = (mdist.init_from_env(args.device, single=True, timeout_s=args.dist_timeout) if args.distributed else
              torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    args.device_type = device.type
    say = print if mdist.is_main() else (lambda *a, **k: None)
    if args.merge_into == "original" and args.method != "qlora":
        raise UsageError("--merge-into original: only a qlora base is quantized; lora and full "
                         "merge into the original weights already")
    if args.paged_device_budget is not None and args.optimizer != "paged_adamw8bit":
        raise UsageError(f"--paged-device-budget: only --optimizer paged_adamw8bit pages its states "
                         f"(this run uses --optimizer {args.optimizer})")
    check_output(args.output)
    make_config(args, pad_id=0)  # every training flag checked before anything is loaded
    torch.manual_seed(args.seed)
    # FSDP places each rank's shards itself: the whole model is only ever held in host memory
    fsdp = args.distributed and args.parallel != "ddp"
    tokenizer, model = load_base(args, torch.device("cpu") if fsdp else device)
    if tokenizer.pad_token_id is None:
        raise UsageError(f"--model {args.model}: the tokenizer has neither a pad nor an end token")
    config = make_config(args, tokenizer.pad_token_id)
    positions = getattr(model.config, "max_position_embeddings", None)
    train_rows, train_data = load_rows("--data", args.data, tokenizer, args.seq_len,
                                       positions=positions)
    eval_rows, eval_data = load_rows("--eval-data", args.eval_data, tokenizer, args.seq_len,
                                     args.eval_samples, positions=positions)
    check_batches(args, len(train_data), say=say)
    check_resume(model, config, train_data, say)
    say(f"model {args.model}: {minift.trainable_summary(model)}")
    say(f"data: {len(train_data)} training examples, {len(eval_data)} held-out; "
          f"method {args.method}, device {device}")
    general = load_general(args.general)
    before = evaluate_all(model, tokenizer, eval_rows, eval_data, config, "cpu" if fsdp else device, general)
    if general and args.method == "qlora":
        # the NF4 base already differs from the original: forgetting is measured against both
        before["general_original"] = original_perplexity(args, tokenizer, general, config,
                                                         "cpu" if fsdp else device)
    say(f"before: exact match {before['exact_match']:.0%}, eval loss {before['eval_loss']:.4f}")
    try:
        # eval_data: the loop evaluates the held-out split at the end, so the summary's "eval" and
        # "eval_loss" carry the final held-out loss (the same number as "after" below).
        summary = minift.train(model, train_data, config, eval_data=eval_data)
    except (ValueError, FileNotFoundError) as err:  # what check_resume cannot see in advance
        raise UsageError(in_flags(str(err))) from err
    after = evaluate_all(model, tokenizer, eval_rows, eval_data, config, device, general)
    say(f"\n{report(before, after)}")
    samples = [torch.tensor(ex["input_ids"]) for ex in eval_data[:4]]
    summary.update(before=before, after=after, base_model=str(args.model))
    if general:
        # against the original base where the base was quantized (QLoRA): what a user ships
        summary["forgetting"] = forgetting(before.get("general_original", before["general"]),
                                           after["general"])
        if "general_original" in before:
            summary["forgetting_vs_nf4_base"] = forgetting(before["general"], after["general"])
    saved = write_outputs(model, tokenizer, args, summary, samples)
    say("saved: " + ", ".join(f"{k} -> {v}" for k, v in saved.items()))
    return summary


def write_outputs(model, tokenizer, args, summary: dict, samples=()) -> dict:
    """The outputs (save_outputs), then summary.json with what was saved. A failed write (a full
    disk) is OutputsNotSaved: training is done and its checkpoints are intact."""
    try:
        saved = save_outputs(model, tokenizer, args, samples)
        check = saved.pop("merge_check", None)
        summary["saved"] = saved
        if check is not None:
            summary["merge_check"] = check
        if mdist.is_main():
            with writing(Path(args.output) / "summary.json", None, Path(args.output)):
                write_json(Path(args.output) / "summary.json", summary)
    except WriteError as err:
        raise OutputsNotSaved(str(err)) from err
    return saved


def usage_error(prog, err) -> None:
    """The one line of a usage error, on stderr. Under torchrun every rank finds the same error
    and exits with 2; rank 0 (RANK, which torchrun sets) alone prints it. The other ranks wait a
    moment before they exit: torchrun stops the remaining workers as soon as one fails, and on a
    busy machine it stopped rank 0 before its line was out."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    else:
        time.sleep(USAGE_ERROR_WAIT_S)


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """Warnings (a dead model, a skipped corrupt checkpoint, dropped rows) as one line each."""
    return f"train_llama.py: warning: {' '.join(str(message).split())}\n"


def main(argv=None) -> int:
    warnings.formatwarning = _warning_line
    try:
        run(parse_args(argv))
    except UsageError as err:
        usage_error("train_llama.py", err)
        return 2
    except OutputsNotSaved as err:
        print(f"train_llama.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("train_llama.py: interrupted; run the same command with --resume to continue from "
              "the last checkpoint", file=sys.stderr)
        return 130
    except (FloatingPointError, OSError) as err:  # divergence; a full disk while saving
        if mdist.is_main():  # every rank stops; rank 0 says why, once
            print(f"train_llama.py: training stopped: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
