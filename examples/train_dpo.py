"""DPO after SFT: start from the adapter examples/train_llama.py writes and prefer right answers.

    python examples/train_dpo.py                 # offline: shipped base, SFT adapter, pairs
    python examples/train_dpo.py --sft-adapter runs/train_llama/adapter --beta 0.1
    python examples/train_dpo.py --method qlora --precompute-reference
    torchrun --nproc_per_node 2 examples/train_dpo.py      # FSDP over 2 processes

The SFT adapter (trained first with examples/train_llama.py's defaults when it is missing) is
merged into the base, so the SFT model is both the policy's start and DPO's reference: a fresh
LoRA adapter goes on top, and the reference is that model with the adapter switched off (no
second copy); with --method qlora the SFT model is quantized to NF4 first. Training pairs are
the shipped chat questions with the right answer as "chosen" and a one-digit near miss as
"rejected" (examples/make_preferences.py). Before and after, it
reports on held-out pairs the reward accuracy and how often the policy gives the right answer the
higher log-probability, the exact match of greedy replies to the held-out questions, and the
perplexity of the shipped general text (forgetting). Bad input: one line on stderr, exit code 2.
Under torchrun every rank trains its share of each step's pairs (the flags give the global batch)
and rank 0 alone prints and writes the outputs, errors included.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import train_llama as sft
from train_llama import HERE, UsageError, _number, check_output, in_flags

import minift
from minift.data.preference import load_preferences
from minift.distributed import checkpoint as dckpt
from minift.distributed import parallel as mdist
from minift.evaluation.forgetting import forgetting
from minift.models.config import ModelConfig
from minift.objectives.dpo import AdapterReference, DPOObjective

DATA = HERE / "data"
# TrainConfig field -> flag of this script, for errors in the flags' words (train_llama.in_flags)
FLAG_OF_FIELD = {**{k: v for k, v in sft.FLAG_OF_FIELD.items() if k in (
                     "method", "learning_rate", "epochs", "max_steps", "micro_batch_size", "seed",
                     "device", "output_dir", "parallel", "fsdp_cpu_offload")},
                 "dpo_beta": "--beta", "dpo_loss": "--loss", "dpo_sft_weight": "--sft-weight",
                 "precompute_reference": "--precompute-reference"}


def parse_args(argv=None):
    p = sft.OneLineParser(prog="train_dpo.py", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--model", default=str(HERE / "base"), help="the base checkpoint the SFT adapter is for")
    add("--sft-adapter", default="runs/train_llama/adapter",
        help="PEFT adapter from examples/train_llama.py; trained first when missing")
    add("--data", default=str(DATA / "dpo_train.jsonl"), help="preference JSONL for training")
    add("--eval-data", default=str(DATA / "dpo_eval.jsonl"), help="held-out preference JSONL")
    add("--chat-eval", default=str(DATA / "eval.jsonl"), help="held-out chat JSONL (exact match)")
    add("--general", default=str(DATA / "general.jsonl"),
        help="general text (forgetting check); '' = off")
    add("--method", default="lora", choices=("lora", "qlora"),
        help="the LoRA adapter trains on the SFT model as it is (lora) or quantized to NF4 (qlora)")
    add("--precompute-reference", action="store_true",
        help="score every pair with the reference once before step 1 (stored in --output) and "
             "drop the reference from the steps")
    add("--beta", type=_number(float, 0, strict=True), default=0.1, help="DPO beta")
    add("--loss", default="sigmoid", choices=("sigmoid", "ipo"))
    add("--sft-weight", type=_number(float, 0), default=1.0,
        help="weight of the chosen replies' per-token NLL added to the DPO loss (RPO); 0 = "
             "plain DPO, which cost exact match on the shipped task (docs/dpo.md)")
    add("--lr", type=_number(float, 0, strict=True), default=3e-4)
    add("--epochs", type=_number(int, 1), default=1)
    add("--max-steps", type=_number(int, 1), default=None)
    add("--batch-size", type=_number(int, 1), default=16, help="pairs per micro-batch")
    add("--r", type=_number(int, 1), default=8)
    add("--alpha", type=_number(float, 0, strict=True), default=16.0)
    add("--seq-len", type=_number(int, 2), default=64)
    add("--sft-steps", type=_number(int, 1), default=None,
        help="steps of the SFT run made when --sft-adapter is missing (default: its own)")
    add("--eval-samples", type=_number(int, 1), default=None, help="first N held-out rows only")
    add("--output", default="runs/train_dpo")
    add("--seed", type=_number(int, 0, maximum=2**32), default=0)
    add("--device", type=sft._device, default=None)
    sft.add_torchrun_arguments(add)
    return sft.with_launch(p.parse_args(argv))


def sft_model(args, device, say=print):
    """The SFT model (the SFT adapter merged into the base), training the SFT adapter first when
    it does not exist (under torchrun, on all ranks)."""
    adapter = Path(args.sft_adapter)
    if not adapter.exists():
        say(f"{adapter} is missing: training it first with examples/train_llama.py")
        flags = ["--model", args.model, "--output", str(adapter.parent), "--seed", str(args.seed)]
        flags += ["--max-steps", str(args.sft_steps)] if args.sft_steps else []
        flags += ["--device", args.device] if args.device else []
        flags += ["--eval-samples", str(args.eval_samples)] if args.eval_samples else []
        flags += ["--parallel", args.parallel] if args.parallel else []
        sft.run(sft.parse_args(flags))
    try:
        model = minift.load_model(args.model, dtype=torch.float32, device=device)
        minift.load_adapter(model, adapter)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise UsageError(f"--model {args.model} / --sft-adapter {adapter}: {err}") from err
    return minift.merge_lora(model)


def sft_policy(args, device, say=print):
    """The SFT model (NF4 with --method qlora) with a fresh LoRA adapter on top."""
    # the SFT model is DPO's reference: the adapter below starts at zero on top of it
    model = sft_model(args, device, say)
    if args.method == "qlora":
        model = minift.quantize_model(model)
    torch.manual_seed(args.seed)  # the fresh adapter's A: the same whether or not SFT trained just now
    return minift.lora_wrap(model, r=args.r, alpha=args.alpha)


def load_pairs(flag, path, tokenizer, seq_len, limit=None, positions=None):
    """Tokenized pairs of a preference JSONL file, each sequence (prompt + one reply) within
    --seq-len and the model's positions; errors name the flag and line."""
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        pairs, stats = load_preferences(path, tokenizer, sft.NO_CUT)
    except ValueError as err:
        raise UsageError(f"{flag}: {err}") from err
    lengths = [max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    sft.check_lengths(flag, path, lengths, stats["longest"], stats["longest_line"], seq_len,
                      positions, what="sequence")
    return pairs[:limit]


def model_config(path) -> ModelConfig:
    """The base's config.json, read before the model loads (and before any SFT run)."""
    try:
        return ModelConfig.from_json(path)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise UsageError(f"--model {path}: {err}") from err


def measure(model, objective, tokenizer, pairs, chat, general, config, device) -> dict:
    """Held-out pair metrics, exact match of replies, general-text perplexity."""
    out = objective.evaluate(model, pairs, config, device)
    prompts = [r["messages"][:-1] for r in chat]
    refs = [r["messages"][-1]["content"] for r in chat]
    out.update(minift.evaluate(model, tokenizer, prompts, refs, general_texts=general, device=device,
                               bf16=config.bf16, loss_chunk_size=config.loss_chunk_size))
    return out


def report(before: dict, after: dict, change=None) -> str:
    def pct(r, key):
        return f"{r[key]:.0%}"

    rows = [("", "before", "after"),
            ("reward accuracy (held-out pairs)", pct(before, "eval_reward_accuracy"),
             pct(after, "eval_reward_accuracy")),
            ("right answer more likely", pct(before, "eval_logp_accuracy"),
             pct(after, "eval_logp_accuracy")),
            ("reward margin", f"{before['eval_reward_margin']:.3f}", f"{after['eval_reward_margin']:.3f}"),
            ("DPO loss (held-out pairs)", f"{before['eval_loss']:.4f}", f"{after['eval_loss']:.4f}"),
            ("exact match (held-out chat)", pct(before["task"], "exact_match"),
             pct(after["task"], "exact_match")),
            ("token F1 (held-out chat)", f"{before['task']['token_f1']:.3f}",
             f"{after['task']['token_f1']:.3f}")]
    if change is not None:  # --general '' turns the forgetting check off
        rows.append(("general-text perplexity", f"{change['before']:.3f}", f"{change['after']:.3f}"))
    lines = [f"{a:<34}{b:>12}{c:>12}" for a, b, c in rows]
    if change is not None:
        verdict = "within" if change["within_budget"] else "OVER"
        lines.append(f"general-text perplexity change {change['relative_change']:+.2%} ({verdict} "
                     f"the {change['budget']:.0%} budget)")
    return "\n".join(lines)


def run(args) -> dict:
    # under torchrun: join the process group first, so "cuda" is this rank's GPU from here on
    sft.check_launch(args)
    device = (mdist.init_from_env(args.device, single=True, timeout_s=args.dist_timeout) if args.distributed else
              torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    say = print if mdist.is_main() else (lambda *a, **k: None)
    # FSDP places each rank's shards itself: before training the model is held in host memory
    fsdp = args.distributed and args.parallel != "ddp"
    check_output(args.output)
    torch.manual_seed(args.seed)
    try:
        tokenizer = minift.load_tokenizer(args.model)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        raise UsageError(f"--model {args.model}: {err}") from err
    # every input is read and checked before any training (the SFT run included)
    shape = model_config(args.model)
    with torch.device("meta"):  # the layers' shapes, no weights: --r is checked before any work
        sft.check_rank(minift.Llama(shape), args.r, say=say)
    positions = shape.max_position_embeddings
    pairs = load_pairs("--data", args.data, tokenizer, args.seq_len, positions=positions)
    eval_pairs = load_pairs("--eval-data", args.eval_data, tokenizer, args.seq_len, args.eval_samples,
                            positions)
    chat, _ = sft.load_rows("--chat-eval", args.chat_eval, tokenizer, args.seq_len, args.eval_samples,
                            positions)
    sft.check_batches(args, len(pairs), what="pairs", say=say)
    general = sft.load_general(args.general)
    try:
        config = minift.TrainConfig(
            method=args.method, objective="dpo", dpo_beta=args.beta, dpo_loss=args.loss,
            dpo_sft_weight=args.sft_weight, precompute_reference=args.precompute_reference,
            learning_rate=args.lr, warmup_ratio=0.1, epochs=args.epochs, max_steps=args.max_steps,
            micro_batch_size=args.batch_size, bf16=device.type == "cuda",
            pad_id=tokenizer.pad_token_id, output_dir=args.output, seed=args.seed,
            device=str(device), log_interval=10, save_interval=100, parallel=args.parallel,
            fsdp_cpu_offload=args.fsdp_cpu_offload, dist_timeout=args.dist_timeout)
    except ValueError as err:
        raise UsageError(in_flags(str(err), FLAG_OF_FIELD)) from err
    model = sft_policy(args, torch.device("cpu") if fsdp else device, say)
    say(f"policy: SFT model ({args.sft_adapter} merged into {args.model}) + fresh LoRA: "
        f"{minift.trainable_summary(model)}")
    say(f"data: {len(pairs)} training pairs, {len(eval_pairs)} held-out pairs, {len(chat)} "
        f"held-out questions; beta {args.beta}, loss {args.loss}, device {device}")
    # the before/after pair metrics are plain DPO's, whatever --sft-weight trains with
    objective = DPOObjective(AdapterReference(model), beta=args.beta, loss_type=args.loss)
    before = measure(model, objective, tokenizer, eval_pairs, chat, general, config,
                     torch.device("cpu") if fsdp else device)
    summary = minift.train(model, pairs, config, eval_data=eval_pairs)
    # under FSDP `model` is sharded now: every rank runs the same forwards of the evaluation
    after = measure(model, objective, tokenizer, eval_pairs, chat, general, config, device)
    change = forgetting(before["general"], after["general"]) if general else None
    say(f"\n{report(before, after, change)}")
    out = Path(args.output)
    save = save_outputs_distributed if args.distributed else save_outputs
    save(model, tokenizer, args, out)
    summary.update(before=before, after=after, forgetting=change, sft_adapter=str(args.sft_adapter),
                   saved={"adapter": str(out / "adapter"), "base": str(out / "sft_merged")})
    if mdist.is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    say(f"saved: adapter -> {out / 'adapter'} (for the SFT model in {out / 'sft_merged'})")
    return summary


def save_outputs(model, tokenizer, args, out: Path) -> None:
    """The SFT model the adapter is for (merged, HF format; with --method qlora its dequantized
    NF4 weights, which the adapter was trained on) and the adapter (PEFT format)."""
    # in the checkpoint's dtype: a merge into NF4 weights without a compute dtype is bfloat16
    keep = sft.checkpoint_dtype(args.model)
    minift.save_model(minift.merge_lora(_copy_base(model)).to(keep), out / "sft_merged")
    tokenizer.save(out / "sft_merged")
    minift.save_adapter(model, out / "adapter", base_model_name_or_path=str(out / "sft_merged"))


def save_outputs_distributed(model, tokenizer, args, out: Path) -> None:
    """``save_outputs`` under torchrun (every rank calls it): the adapter gathered and written by
    rank 0, which also rebuilds the SFT model from --model and --sft-adapter, as they gave it."""
    dckpt.export_adapter(model, out / "adapter", base_model_name_or_path=str(out / "sft_merged"))
    if mdist.is_main():
        # the policy as it started, adapters at zero: the SFT model (dequantized NF4 with qlora)
        start = minift.merge_lora(sft_policy(args, torch.device("cpu"), say=lambda *a: None))
        start = start.to(sft.checkpoint_dtype(args.model))
        minift.save_model(start, out / "sft_merged")
        tokenizer.save(out / "sft_merged")
    mdist.barrier()


def _copy_base(model):
    """The policy's base (the merged SFT model) as its own model: a copy with zeroed adapters."""
    base = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.zero_()
    return base


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except UsageError as err:
        sft.usage_error("train_dpo.py", err)
        return 2
    except FloatingPointError as err:
        print(f"train_dpo.py: training stopped: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
