"""Task metrics: generated replies against reference replies.

* exact match: the normalized strings are equal (lower case, runs of whitespace as one space);
* token F1: harmonic mean of precision and recall of the bag of whitespace tokens (as SQuAD);
* ROUGE-L: F1 of the longest common subsequence of tokens (Lin 2004, with beta = 1);
* JSON validity: the share of replies that parse as JSON, reported when the references do.
"""
from __future__ import annotations

import json


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the multiset of normalized whitespace tokens; 1.0 when both are empty."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum(min(pred.count(t), ref.count(t)) for t in set(pred))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on normalized whitespace tokens; 1.0 when both are empty."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def task_metrics(predictions, references) -> dict:
    """Means of exact match, token F1 and ROUGE-L; json_valid too when every reference is JSON
    (an object or array: a bare number is JSON too, but then the task is not about JSON)."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"task_metrics: {len(predictions)} predictions for {len(references)} "
                         f"references; need the same non-zero number")
    n = len(references)
    out = {"exact_match": sum(map(exact_match, predictions, references)) / n,
           "token_f1": sum(map(token_f1, predictions, references)) / n,
           "rouge_l": sum(map(rouge_l, predictions, references)) / n, "samples": n}
    if all(r.strip()[:1] in ("{", "[") and is_json(r) for r in references):
        out["json_valid"] = sum(map(is_json, predictions)) / n
    return out
