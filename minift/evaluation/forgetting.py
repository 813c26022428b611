"""Evaluation that catches forgetting: task metrics on held-out replies (minift.evaluation.metrics)
and a general-text check.

The general-ability check is the perplexity of plain text the fine-tune never trained on
(examples/data/general.jsonl), before and after training. Its relative change after / before - 1
is compared with a budget (5% by default, the "acceptable drop" of a general benchmark): a
fine-tune that raises it more has overwritten what the base knew. Beside it, multiple-choice
questions (examples/data/general_mc.jsonl, scored by minift.evaluation.multiple_choice) give
acc / acc_norm, whose drop is compared with a budget in percentage points (5 by default).
"""
from __future__ import annotations

import math

import torch

from minift.checks import check_int, check_number
from minift.data.sft import _read_jsonl
from minift.evaluation.length_perplexity import perplexity_by_length
from minift.evaluation.metrics import task_metrics
from minift.evaluation.multiple_choice import multiple_choice
from minift.evaluation.passkey import passkey_grid
from minift.models.generation import generate
from minift.names import IGNORE_INDEX
from minift.objectives.loss import model_loss_sum, supports_chunked_loss

FORGETTING_BUDGET = 0.05  # largest acceptable relative rise of the general-text perplexity
ACCURACY_BUDGET = 0.05  # largest acceptable multiple-choice accuracy drop, absolute (5 points)


# ---- generation --------------------------------------------------------------------------
@torch.no_grad()
def generate_replies(model, tokenizer, conversations, device, batch_size=64, max_new_tokens=None):
    """Greedy replies to each conversation (a list of messages ending with the user's turn).

    Prompts are left-padded so every row's reply starts at the same column. `max_new_tokens`
    defaults to 32.
    """
    was = model.training
    model.eval()
    out, pad = [], tokenizer.pad_token_id
    for start in range(0, len(conversations), batch_size):
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
                   for c in conversations[start:start + batch_size]]
        width = max(map(len, prompts))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        gen = generate(model, ids, max_new_tokens=max_new_tokens or 32, attention_mask=mask,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        out += [tokenizer.decode(row[width:]).strip() for row in gen]
    model.train(was)
    return out


# ---- general text ------------------------------------------------------------------------
def load_texts(path) -> list:
    """The "text" field of each row of a JSONL file; errors name file:line."""
    texts = []
    for lineno, row in _read_jsonl(path):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise ValueError(f"{path}:{lineno}: field 'text' must be a non-empty string")
        texts.append(row["text"])
    return texts


def _windows(ids, length):
    return [ids[i:i + length] for i in range(0, len(ids) - 1, length - 1)]


@torch.no_grad()
def perplexity(model, tokenizer, texts, device, max_length=256, batch_size=8, bf16=False,
               loss_chunk_size=1024) -> dict:
    """Per-token perplexity of plain texts (BOS + text), every token after the first scored.

    A text longer than `max_length` tokens is cut into windows that overlap by one token, so
    every token is predicted exactly once. The loss is the training loss's: with
    `loss_chunk_size` (TrainConfig's, default 1024) a model with an lm_head is scored a chunk
    of tokens at a time, never as (B, T, V) logits and their float32 copy; `bf16` runs the
    forward under bfloat16 autocast as training does.

    Returns:
        {"loss": mean NLL in nats, "perplexity": exp(loss), "tokens": scored tokens}.
    """
    check_int("perplexity: max_length", max_length, minimum=2)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = [w for t in texts for w in _windows(bos + tokenizer.encode(t), max_length) if len(w) > 1]
    if not rows:
        raise ValueError("perplexity: no text with two or more tokens")
    device = torch.device(device)
    chunk_size = loss_chunk_size if supports_chunked_loss(model) else None
    was, total, count = model.training, 0.0, 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
        ids, mask = ids.to(device), mask.to(device)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)  # padding is not scored
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            total += float(model_loss_sum(model, {"input_ids": ids, "attention_mask": mask}, labels, chunk_size))
        count += int((labels[:, 1:] != IGNORE_INDEX).sum())
    model.train(was)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def forgetting(before: dict, after: dict, budget=FORGETTING_BUDGET) -> dict:
    """Relative change of the general-text perplexity, and whether it stays within `budget`."""
    check_number("forgetting: budget", budget, ">= 0", lambda v: v >= 0)
    change = after["perplexity"] / before["perplexity"] - 1.0
    return {"before": before["perplexity"], "after": after["perplexity"],
            "relative_change": change, "budget": budget, "within_budget": change <= budget}


def accuracy_drop(before: dict, after: dict, budget=ACCURACY_BUDGET) -> dict:
    """Drop of the multiple-choice acc and acc_norm (before - after, absolute: 0.05 is five
    percentage points), and whether the acc drop stays within `budget`.

    Absolute, not relative: near chance (25% on four choices) a relative budget would allow
    almost nothing (5% of 25% is 1.25 points, about one question of 100).
    """
    check_number("accuracy_drop: budget", budget, ">= 0", lambda v: v >= 0)
    out = {m: {"before": before[m], "after": after[m], "drop": before[m] - after[m]}
           for m in ("acc", "acc_norm")}
    return {**out, "budget": budget, "within_budget": out["acc"]["drop"] <= budget + 1e-12}


# ---- all of it ---------------------------------------------------------------------------
def evaluate(model, tokenizer, conversations=None, references=None, *, general_texts=None,
             device="cpu", max_new_tokens=None, max_length=256, bf16=False,
             loss_chunk_size=1024, passkey=None, by_length=None, mc_rows=None, mc_fewshot=0,
             mc_seed=0) -> dict:
    """Task metrics of greedy replies, general-text perplexity, and the long-context tasks.

    Args:
        model: any minift/Llama-style model returning logits.
        tokenizer: a `minift.models.tokenizer.Tokenizer` with a chat template.
        conversations: prompts (message lists ending with the user's turn); with `references`,
            the expected replies, for exact match, token F1, ROUGE-L (and JSON validity).
        general_texts: plain texts for the perplexity check (see `load_texts`).
        bf16, loss_chunk_size: how the perplexity's forward and loss run (see `perplexity`);
            pass the TrainConfig's fields to score as training does.
        passkey: passkey retrieval, as keyword arguments of
            `minift.evaluation.passkey.passkey_grid`, e.g. ``{"lengths": [1024, 4096],
            "depths": [0, 0.5, 1], "trials": 5}``.
        by_length: perplexity of ``general_texts`` by context length, as keyword arguments of
            `minift.evaluation.length_perplexity.perplexity_by_length`, e.g.
            ``{"lengths": [512, 2048, 8192], "buckets": 4}``.
        mc_rows, mc_fewshot, mc_seed: multiple-choice questions (see
            `minift.evaluation.multiple_choice.multiple_choice`), with that many few-shot
            examples drawn from the other rows with that seed.

    Returns:
        {"task": {...}, "samples": [...3 first replies...], "general": {...}, "passkey":
        PasskeyResult, "perplexity_by_length": PerplexityCurve}, each part present when its
        inputs were given (the last two have ``table()``, ``save_png(path)``, ``as_dict()``).
        "multiple_choice": {"acc", "acc_norm", ...}. Compare two with
        `forgetting(before["general"], after["general"])` and
        `accuracy_drop(before["multiple_choice"], after["multiple_choice"])`.
    """
    out = {}
    if conversations is not None:
        if references is None or len(references) != len(conversations):
            raise ValueError("evaluate: give one reference reply per conversation")
        replies = generate_replies(model, tokenizer, conversations, device,
                                   max_new_tokens=max_new_tokens)
        out["task"] = task_metrics(replies, references)
        out["samples"] = [{"want": w, "got": g} for w, g in zip(references[:3], replies[:3])]
    if general_texts is not None:
        out["general"] = perplexity(model, tokenizer, general_texts, device, max_length, bf16=bf16,
                                    loss_chunk_size=loss_chunk_size)
    if mc_rows is not None:
        out["multiple_choice"] = multiple_choice(model, tokenizer, mc_rows, mc_fewshot, seed=mc_seed,
                                                 device=device, bf16=bf16, loss_chunk_size=loss_chunk_size)
    if passkey is not None:
        if not isinstance(passkey, dict) or "lengths" not in passkey:
            raise ValueError(f"evaluate: passkey must be a dict of passkey_grid arguments with "
                             f"'lengths', got {passkey!r}")
        out["passkey"] = passkey_grid(model, tokenizer, device=device, **passkey)
    if by_length is not None:
        if not isinstance(by_length, dict) or "lengths" not in by_length:
            raise ValueError(f"evaluate: by_length must be a dict of perplexity_by_length arguments "
                             f"with 'lengths', got {by_length!r}")
        if general_texts is None:
            raise ValueError("evaluate: by_length scores general_texts; give them too")
        out["perplexity_by_length"] = perplexity_by_length(
            model, tokenizer, general_texts, bf16=bf16, device=device, chunk=loss_chunk_size or 1024,
            **by_length)
    return out
