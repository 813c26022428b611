"""Preference data for DPO: JSONL rows of (prompt, chosen reply, rejected reply) to pair batches.

A row is either ``{"prompt": str, "chosen": str, "rejected": str}`` or a chat
``{"messages": [...], "chosen": str, "rejected": str}`` whose messages end with the user's turn.
Each reply is appended to the conversation as the assistant's message and rendered with the
tokenizer's chat template, exactly as SFT data is; the labels keep only the final reply's tokens
(and the token that ends it), so a pair's log-probabilities cover the response and nothing else.

A batch of B pairs is one (2B, T) tensor: rows 0..B-1 are the chosen sequences, rows B..2B-1
the rejected ones in the same order, so one forward scores both halves of every pair.
"""
from __future__ import annotations

import random

import torch

from minift.data.rows import check_no_nul, only_special_tokens
from minift.data.sft import _assistant_spans, _bucket_groups, _read_jsonl, row_to_messages
from minift.names import IGNORE_INDEX

PAIR_KEYS = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")


def _reply(row, key, where) -> str:
    value = row.get(key)
    if isinstance(value, dict) and value.get("role") == "assistant":
        value = value.get("content")  # {"role": "assistant", "content": ...} is a reply too
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: field {key!r} must be a non-empty string (the assistant's "
                         f"reply), got {type(value).__name__} {value!r}"[:300])
    return check_no_nul(value, where, f"field {key!r}")


def row_to_preference(row, where="<row>"):
    """(prompt messages, chosen reply, rejected reply) of one preference row.

    Raises:
        ValueError: naming `where` (file:line) for a missing or empty field, a conversation that
            does not end with the user's turn, or a pair whose two replies are identical.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing or not ("prompt" in row or "messages" in row):
        raise ValueError(f"{where}: a preference row needs 'prompt' (or chat 'messages'), "
                         f"'chosen' and 'rejected'; got keys {sorted(row)}")
    if "messages" in row:
        prompt = row_to_messages({"messages": row["messages"]}, where)
        if prompt[-1]["role"] == "assistant":
            raise ValueError(f"{where}: 'messages' must end with the user's turn; the replies go "
                             f"in 'chosen' and 'rejected'")
    else:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"{where}: field 'prompt' must be a non-empty string")
        prompt = [{"role": "user", "content": check_no_nul(row["prompt"], where, "field 'prompt'")}]
    chosen, rejected = _reply(row, "chosen", where), _reply(row, "rejected", where)
    if chosen == rejected:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same reply; a pair must differ")
    return prompt, chosen, rejected


def _tokenize_reply(tokenizer, prompt, reply, max_length, where):
    """Ids of prompt + reply cut to `max_length`, labels on the reply's tokens only (the last
    assistant span), and the length in tokens before the cut."""
    messages = prompt + [{"role": "assistant", "content": reply}]
    text, spans = _assistant_spans(tokenizer, messages, where)
    start, end = spans[-1]
    ids, offsets = tokenizer.encode_with_offsets(text)
    labels = [tok if s < end and e > start else IGNORE_INDEX for tok, (s, e) in zip(ids, offsets)]
    length = len(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise ValueError(f"{where}: the prompt fills max_length={max_length} tokens, so no token "
                         f"of the reply is left to score; raise max_length or shorten the prompt")
    return ids, labels, length


def tokenize_preferences(rows, tokenizer, max_length, source="<data>", *, line_numbers=None):
    """Tokenize preference rows into pairs.

    Args:
        rows: dicts as described in the module docstring.
        tokenizer: a `minift.models.tokenizer.Tokenizer` with a chat template.
        max_length: each sequence (prompt + one reply) is cut to this many tokens.
        source: file name used in error messages.
        line_numbers: line of each row in `source`; default 1, 2, 3, ...

    Returns:
        (pairs, stats): pairs are dicts with chosen_ids, chosen_labels, rejected_ids,
        rejected_labels (lists of ints); stats counts rows, truncated sequences and tokens, and
        gives the longest sequence before any cut (``longest``) and its line (``longest_line``).
    """
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if not rows:
        raise ValueError(f"{source}: empty dataset (no rows)")
    lines = list(line_numbers) if line_numbers is not None else range(1, len(rows) + 1)
    pairs = []
    stats = {"rows": len(rows), "pairs": 0, "truncated": 0, "tokens": 0, "longest": 0, "longest_line": 0}
    for lineno, row in zip(lines, rows):
        where = f"{source}:{lineno}"
        prompt, chosen, rejected = row_to_preference(row, where)
        pair = {}
        for half, reply in (("chosen", chosen), ("rejected", rejected)):
            if only_special_tokens(tokenizer, reply):
                raise ValueError(f"{where}: field {half!r} holds only special tokens "
                                 f"({reply[:80]!r}), no reply to score")
            ids, labels, full = _tokenize_reply(tokenizer, prompt, reply, max_length, where)
            if full > stats["longest"]:
                stats["longest"], stats["longest_line"] = full, lineno
            cut = full > max_length
            pair[f"{half}_ids"], pair[f"{half}_labels"] = ids, labels
            stats["truncated"] += cut
            stats["tokens"] += len(ids)
        pairs.append(pair)
    stats["pairs"] = len(pairs)
    return pairs, stats


def load_preferences(path, tokenizer, max_length):
    """Read and tokenize a preference JSONL file; every error names ``path:line``.

    Returns:
        (pairs, stats) as from `tokenize_preferences`.
    """
    numbered = _read_jsonl(path)
    return tokenize_preferences([r for _, r in numbered], tokenizer, max_length, source=str(path),
                                line_numbers=[n for n, _ in numbered])


def is_pair(example) -> bool:
    return isinstance(example, dict) and "chosen_ids" in example and "rejected_ids" in example


def check_pairs(pairs, name="train_data"):
    """Raise ValueError naming `name[i]` unless every item is a tokenized pair."""
    if not isinstance(pairs, (list, tuple)) or not pairs:
        raise ValueError(f"{name} must be a non-empty list of preference pairs")
    for i, p in enumerate(pairs):
        if not is_pair(p):
            raise ValueError(f"{name}[{i}] must be a preference pair with chosen_ids, chosen_labels, "
                             f"rejected_ids and rejected_labels (see minift.data.preference.load_preferences)")
        for half in ("chosen", "rejected"):
            if len(p[f"{half}_ids"]) != len(p[f"{half}_labels"]) or len(p[f"{half}_ids"]) < 2:
                raise ValueError(f"{name}[{i}]: {half}_ids and {half}_labels must have the same "
                                 f"length, at least 2")


def collate_pairs(pairs, pad_id, indices=None):
    """Right-padded (2B, T) batch: chosen rows first, then the rejected rows in the same order.

    Returns:
        {"input_ids", "labels", "attention_mask"} of shape (2B, T), "pair_index" (B,) (the pairs'
        positions in the data set), and "ref_logps" (2B,) float64 when every pair carries stored
        reference log-probabilities.
    """
    indices = list(range(len(pairs))) if indices is None else list(indices)
    seqs = [(p["chosen_ids"], p["chosen_labels"]) for p in pairs]
    seqs += [(p["rejected_ids"], p["rejected_labels"]) for p in pairs]
    width = max(len(ids) for ids, _ in seqs)
    batch = {"input_ids": torch.full((len(seqs), width), pad_id, dtype=torch.long),
             "labels": torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros(len(seqs), width, dtype=torch.long)}
    for row, (ids, labels) in enumerate(seqs):
        batch["input_ids"][row, :len(ids)] = torch.tensor(ids)
        batch["labels"][row, :len(ids)] = torch.tensor(labels)
        batch["attention_mask"][row, :len(ids)] = 1
    batch["pair_index"] = torch.tensor(indices, dtype=torch.long)
    if all("ref_logps" in p for p in pairs):
        chosen = [p["ref_logps"][0] for p in pairs]
        rejected = [p["ref_logps"][1] for p in pairs]
        batch["ref_logps"] = torch.tensor(chosen + rejected, dtype=torch.float64)
    return batch


def select_pairs(batch, index):
    """Pairs ``index`` (a slice or index tensor over the B pairs) of a (2B, T) pair batch, in the
    same layout: their chosen rows first, then their rejected rows; pair_index and ref_logps follow."""
    b = batch["pair_index"].shape[0]
    pairs = torch.arange(b)[index]
    rows = torch.cat([pairs, pairs + b])
    return {k: v[pairs] if k == "pair_index" else v[rows] for k, v in batch.items()}


def pair_batches(pairs, batch_size, *, pad_id, seed=0, shuffle=True, by_length=True):
    """Pairs in batches of `batch_size`, pairs of similar length together (as SFT's bucketing;
    `by_length` False: random batches), in an order fixed by `seed`; the global RNG is neither
    used nor changed."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lengths = [max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs]
    groups = _bucket_groups(lengths, batch_size, random.Random(seed), shuffle, by_length)
    return [collate_pairs([pairs[i] for i in g], pad_id, g) for g in groups]
