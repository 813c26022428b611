"""Multiple-choice questions scored by log-likelihood, as lm-evaluation-harness scores its
``multiple_choice`` tasks (MMLU, ARC, HellaSwag).

Each row is ``{"question": str, "choices": [str, ...], "answer": int}``. The context is the
few-shot examples and ``"Question: {question}\\nAnswer:"``; each choice is the continuation
``" " + choice``. For every choice the model's summed log-likelihood of the continuation's
tokens given the context is computed, and

    acc       argmax_i  loglik_i                      equals the answer
    acc_norm  argmax_i  loglik_i / len(choice_i)      equals the answer

with ``len`` the choice's length in characters (Python ``len`` of the choice text, without the
leading space), the ``completion_len`` the harness divides by. Ties go to the first choice
(numpy's and torch's argmax both do).

Tokens are split as the harness splits them: context and context + continuation are encoded
separately (each after BOS when the tokenizer has one, as Llama tokenizers encode by default),
and the continuation is whatever the whole encoding holds past the context's token count. The
model reads the context's own tokens followed by those, so a token that merges across the
boundary is scored as part of the continuation, the context keeps its own encoding. Trailing
spaces of the context move to the continuation first, as in the harness.
"""
from __future__ import annotations

import random

import torch

from minift.checks import check_int
from minift.files import read_jsonl
from minift.names import IGNORE_INDEX
from minift.objectives.reference import model_logps


def check_row(row, where: str) -> None:
    """Raise a one-line ValueError, starting with `where`, naming the first bad field of ``row``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a dict, got {type(row).__name__}")
    q, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where}: field 'question' must be a non-empty string, got {q!r}")
    if (not isinstance(choices, list) or len(choices) < 2
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise ValueError(f"{where}: field 'choices' must be a list of >= 2 non-empty strings, "
                         f"got {choices!r}")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: field 'answer' must be an index into the {len(choices)} "
                         f"choices, got {answer!r}")


def check_rows(rows, what: str = "row") -> list:
    """``rows`` as a list, each checked by ``check_row``; errors name the row's index."""
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"multiple_choice: {what}s must be a list of dicts, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        check_row(row, f"multiple_choice: {what} {i}")
    return list(rows)


def load_choice_rows(path) -> list:
    """The rows of a multiple-choice JSONL file; errors name file:line and the field."""
    rows = read_jsonl(path)
    for lineno, row in rows:
        check_row(row, f"{path}:{lineno}")
    return [row for _, row in rows]


def prompt(row: dict) -> str:
    """The context of one question: ``"Question: ...\\nAnswer:"``."""
    return f"Question: {row['question'].strip()}\nAnswer:"


def contexts(rows: list, num_fewshot: int = 0, fewshot_rows=None, seed: int = 0) -> list:
    """The context of each row: ``num_fewshot`` solved examples, then the question, joined by
    blank lines.

    The examples are drawn without replacement by ``random.Random(seed)``, row after row, from
    ``fewshot_rows`` or, when None, from the other rows (never the row being scored). Each
    example is its prompt followed by ``" " + its answer's text``.
    """
    pool = rows if fewshot_rows is None else fewshot_rows
    available = len(pool) - (1 if fewshot_rows is None else 0)
    if num_fewshot > available:
        raise ValueError(f"multiple_choice: num_fewshot={num_fewshot} but only {available} few-shot "
                         f"rows to draw from")
    rng, out = random.Random(seed), []
    for i, row in enumerate(rows):
        ids = [j for j in range(len(pool)) if fewshot_rows is not None or j != i]
        shots = [pool[j] for j in rng.sample(ids, num_fewshot)]
        out.append("\n\n".join([f"{prompt(s)} {s['choices'][s['answer']]}" for s in shots] + [prompt(row)]))
    return out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list, list]:
    """(context tokens, continuation tokens) split as the harness splits them (module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ctx = bos + tokenizer.encode(context)
    whole = bos + tokenizer.encode(context + continuation)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihoods(model, pairs: list, device="cpu", batch_size: int = 16, bf16: bool = False,
                   loss_chunk_size=1024) -> list:
    """Summed log p(continuation | context) of each (context tokens, continuation tokens) pair.

    One forward per ``batch_size`` pairs, right-padded; only continuation tokens are labelled.
    The log-probabilities come from ``minift.objectives.reference.model_logps``: with
    ``loss_chunk_size`` and minift's Llama the lm_head and log-softmax run a chunk of tokens at a
    time, never as (B, T, V) float32 logits.
    """
    check_int("multiple_choice: batch_size", batch_size, minimum=1)
    device = torch.device(device)
    was, out = model.training, []
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        width = max(len(c) + len(x) for c, x in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, (ctx, cont) in enumerate(chunk):
            n = len(ctx) + len(cont)
            ids[i, :n], mask[i, :n] = torch.tensor(ctx + cont), 1
            labels[i, len(ctx):n] = torch.tensor(cont)
        logps, _ = model_logps(model, {"input_ids": ids, "attention_mask": mask, "labels": labels},
                               device, bf16=bf16, chunk=loss_chunk_size)
        out += logps.tolist()
    model.train(was)
    return out


def multiple_choice(model, tokenizer, rows, num_fewshot: int = 0, fewshot_rows=None,
                    batch_size: int = 16, seed: int = 0, *, device="cpu", bf16: bool = False,
                    loss_chunk_size=1024) -> dict:
    """Accuracy of `model` on multiple-choice ``rows`` scored by log-likelihood (module docstring).

    Args:
        rows: dicts ``{"question": str, "choices": [str, ...] (>= 2), "answer": int}``.
        num_fewshot: solved examples before each question, drawn with ``seed`` from
            ``fewshot_rows`` (or from the other rows when None).
        batch_size: (context, choice) pairs per forward.
        bf16, loss_chunk_size: how the forward and the log-softmax run (see ``loglikelihoods``).

    Returns:
        {"acc", "acc_norm": shares of rows answered right, "predictions", "predictions_norm":
        the chosen index per row, "loglikelihoods": per row, one summed log-likelihood per
        choice, "n": rows, "num_fewshot"}.
    """
    rows = check_rows(rows)
    if not rows:
        raise ValueError("multiple_choice: no rows to score")
    check_int("multiple_choice: num_fewshot", num_fewshot, minimum=0)
    if fewshot_rows is not None:
        fewshot_rows = check_rows(fewshot_rows, "fewshot row")
    pairs, owner = [], []
    for i, ctx in enumerate(contexts(rows, num_fewshot, fewshot_rows, seed)):
        for choice in rows[i]["choices"]:
            pairs.append(encode_pair(tokenizer, ctx, " " + choice))
            owner.append(i)
    flat = loglikelihoods(model, pairs, device, batch_size, bf16, loss_chunk_size)
    lls = [[] for _ in rows]
    for i, ll in zip(owner, flat):
        lls[i].append(ll)
    pred = [max(range(len(ll)), key=ll.__getitem__) for ll in lls]
    pred_norm = [max(range(len(ll)), key=lambda k: ll[k] / len(row["choices"][k]))
                 for ll, row in zip(lls, rows)]
    right = lambda preds: sum(p == r["answer"] for p, r in zip(preds, rows)) / len(rows)  # noqa: E731
    return {"acc": right(pred), "acc_norm": right(pred_norm), "predictions": pred,
            "predictions_norm": pred_norm, "loglikelihoods": lls, "n": len(rows),
            "num_fewshot": num_fewshot}
