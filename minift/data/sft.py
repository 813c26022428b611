"""From a JSONL file to masked, padded or packed training batches.

Rows are chats ({"messages": [...]}), ShareGPT ({"conversations": [{"from", "value"}, ...]}),
alpaca ({"instruction", "input", "output"}) or {"prompt", "completion"}; each becomes a
conversation rendered with the tokenizer's chat template. Labels equal the input ids on the
assistant's replies (with the token that ends each reply) and -100 everywhere else, so the loss
trains only what the model should say. Raw {"text": ...} rows are trained on every token.
"""
from __future__ import annotations

import bisect
import os
import random
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from minift.data.rows import (  # noqa: F401
    ROLES,
    SHAREGPT_ROLES,
    _read_jsonl,
    _text_field,
    _tokenize_text,
    conversation,
    load_jsonl,
    only_special_tokens,
    row_to_messages,
)
from minift.names import IGNORE_INDEX


@dataclass
class DataStats:
    """Counts from `tokenize_rows`: rows read, examples kept, truncated and dropped rows, tokens
    (trained = labels that are not -100, total = all input ids of kept examples), and the
    longest row in tokens before any cut, with its line."""
    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    trained_tokens: int = 0
    total_tokens: int = 0
    longest: int = 0
    longest_line: int = 0

    def __getitem__(self, key):
        return getattr(self, key)

    def as_dict(self) -> dict:
        return asdict(self)


def _assistant_spans(tokenizer, messages, where):
    """The rendered conversation and the [start, end) character spans of the assistant replies.

    The template is rendered incrementally: for the assistant message i, the conversation up to
    it with the generation prompt is exactly what the model sees at inference, and the
    conversation including message i adds the reply and its end-of-turn marker. The characters
    between the two renders are the reply. Trailing whitespace after the end-of-turn marker
    (ChatML's "\\n") is left out: the model should stop at the marker, not learn what follows.
    A template that rewrites earlier turns when later ones arrive cannot be split this way;
    that is an error, not a silently wrong mask.
    """
    def render(msgs, gen=False):
        try:
            return tokenizer.apply_chat_template(msgs, add_generation_prompt=gen)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from err

    text = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (full.startswith(prompt) and text.startswith(full)):
            raise ValueError(f"{where}: the chat template does not render the conversation up to "
                             f"message {i} as a prefix of the whole, so the reply cannot be located")
        spans.append((len(prompt), max(len(prompt), len(full.rstrip()))))
    return text, spans


def _tokenize_messages(tokenizer, messages, where, fields=None):
    """Input ids of the whole rendered conversation and labels aligned with them.

    The conversation is tokenized once as a whole (the ids equal those of
    `apply_chat_template(..., tokenize=True)`), and a token is trained when its characters
    overlap a reply span. A token that straddles the prompt/reply boundary (a merged leading
    space) is one the model has to produce, so it is trained. A reply of special tokens only
    ("</s>") is an error naming its field (``fields[i]``, as `conversation` gives them).
    """
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and only_special_tokens(tokenizer, m["content"]):
            field = fields[i] if fields else f"messages[{i}].content"
            raise ValueError(f"{where}: {field}, an assistant reply, holds only special tokens "
                             f"({m['content'][:80]!r}), no words to train on")
    text, spans = _assistant_spans(tokenizer, messages, where)
    ids, offsets = tokenizer.encode_with_offsets(text)
    labels = [tok if any(s < b and e > a for a, b in spans) else IGNORE_INDEX
              for tok, (s, e) in zip(ids, offsets)]
    return ids, labels


def tokenize_rows(rows: list[dict], tokenizer, max_length: int, source: str = "<data>", *,
                  line_numbers: Optional[list[int]] = None) -> tuple[list[dict], DataStats]:
    """Renders rows with the chat template and masks everything but the assistant replies.

    Args:
        rows: list of dicts in any supported shape (see `row_to_messages`).
        tokenizer: a `minift.models.tokenizer.Tokenizer` with a chat template.
        max_length: examples longer than this are cut to their first `max_length` tokens.
        source: name used in messages (the file name).
        line_numbers: line number of each row in `source`; default 1, 2, 3, ...

    Returns:
        (examples, stats): examples are {"input_ids": list[int], "labels": list[int]};
        stats is a `DataStats`.

    Raises:
        ValueError: naming source:line: no rows, a row of unknown shape (and its keys), a field
            holding a NUL character, an empty reply or text of special tokens only; or no
            example left with a trainable token.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if not rows:
        raise ValueError(f"{source}: empty dataset (no rows)")
    lines = list(line_numbers) if line_numbers is not None else range(1, len(rows) + 1)
    stats, examples, first_dropped, cut = DataStats(rows=len(rows)), [], None, 0
    for lineno, row in zip(lines, rows):
        where = f"{source}:{lineno}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a dict, got {type(row).__name__}")
        if "text" in row and not {"messages", "conversations", "prompt", "instruction"} & set(row):
            ids, labels = _tokenize_text(tokenizer, _text_field(row, "text", where), where)
        else:
            messages, fields = conversation(row, where)
            ids, labels = _tokenize_messages(tokenizer, messages, where, fields)
        if len(ids) > stats.longest:
            stats.longest, stats.longest_line = len(ids), lineno
        was_cut = len(ids) > max_length
        if was_cut:
            ids, labels = ids[:max_length], labels[:max_length]
            stats.truncated += 1
        # labels[0] is never predicted (the loss shifts by one), so it does not count
        trained = sum(label != IGNORE_INDEX for label in labels[1:])
        if trained == 0:
            stats.dropped += 1
            cut += was_cut  # its replies began past max_length
            first_dropped = lineno if first_dropped is None else first_dropped
            continue
        examples.append({"input_ids": ids, "labels": labels})
        stats.trained_tokens += trained
        stats.total_tokens += len(ids)
    stats.examples = len(examples)
    if stats.dropped:
        why = []  # the cause of each drop, so the message does not blame truncation for all
        if cut:
            why.append(f"{cut} whose replies start after max_length={max_length} tokens")
        if stats.dropped - cut:
            why.append(f"{stats.dropped - cut} without an assistant reply to train on")
        warnings.warn(f"{source}: dropped {stats.dropped} row(s) with no trainable tokens: "
                      f"{' and '.join(why)} (first at line {first_dropped})", stacklevel=2)
    if not examples:
        raise ValueError(f"{source}: no example with a trainable token is left "
                         f"({stats.dropped} of {stats.rows} rows dropped: {' and '.join(why)})")
    return examples, stats


def load_dataset(path: str | os.PathLike, tokenizer, max_length: int) -> tuple[list[dict], DataStats]:
    """`load_jsonl` + `tokenize_rows`, with errors naming the file and line.

    Args:
        path: JSONL file.
        tokenizer: a `minift.models.tokenizer.Tokenizer` with a chat template.
        max_length: truncation length in tokens.

    Returns:
        (examples, stats) as from `tokenize_rows`.
    """
    numbered = _read_jsonl(path)
    return tokenize_rows([row for _, row in numbered], tokenizer, max_length, source=str(path),
                         line_numbers=[n for n, _ in numbered])


def _check_examples(examples, max_length):
    if not examples:
        raise ValueError("batch_examples: no examples")
    for i, ex in enumerate(examples):
        ids, labels = ex.get("input_ids"), ex.get("labels")
        if ids is None or labels is None or len(ids) != len(labels) or not ids:
            raise ValueError(f"example {i}: needs non-empty 'input_ids' and 'labels' of equal length")
        if max_length is not None and len(ids) > max_length:
            raise ValueError(f"example {i} has {len(ids)} tokens > max_length={max_length}; "
                             "tokenize with the same max_length")


def _bucket_groups(lengths, batch_size, rng, shuffle, by_length=True):
    """Index lists, one per batch: similar lengths together, order still random.

    Sorting inside shuffled mega-chunks of 50 batches keeps padding low while an epoch still
    mixes short and long batches; sorting the whole set would make batch order follow length.
    `by_length` False: the shuffled examples cut into batches as they come (random batches).
    """
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if not by_length:
        return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
    chunk = 50 * batch_size
    groups = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        groups += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    if shuffle:
        rng.shuffle(groups)
    return groups


def _pack_rows(lengths, max_length, rng, shuffle):
    """Best-fit decreasing: each sample, longest first, goes into the fullest row it fits.

    `free` is a sorted list of (space left, row) so the best row is one bisect away.
    """
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)  # ties in length keep a seeded random order
    order.sort(key=lambda i: -lengths[i])
    rows, free = [], []
    for i in order:
        k = bisect.bisect_left(free, (lengths[i], -1))
        if k == len(free):
            rows.append([i])
            left, r = max_length - lengths[i], len(rows) - 1
        else:
            space, r = free.pop(k)
            rows[r].append(i)
            left = space - lengths[i]
        if left > 0:
            bisect.insort(free, (left, r))
    if shuffle:
        rng.shuffle(rows)
    return rows


def _collate(rows, pad_id, packed):
    """Right-pads rows of samples into (B, T) long tensors, T = the longest row."""
    width = max(sum(len(ex["input_ids"]) for ex in row) for row in rows)
    batch = {"input_ids": torch.full((len(rows), width), pad_id, dtype=torch.long),
             "labels": torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), width, dtype=torch.long)}
    if packed:
        batch["position_ids"] = torch.zeros(len(rows), width, dtype=torch.long)
        batch["segment_ids"] = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        pos = 0
        for seg, ex in enumerate(row, start=1):
            n = len(ex["input_ids"])
            batch["input_ids"][b, pos:pos + n] = torch.tensor(ex["input_ids"])
            batch["labels"][b, pos:pos + n] = torch.tensor(ex["labels"])
            batch["attention_mask"][b, pos:pos + n] = 1
            if packed:
                # the first token of a packed sample would be predicted from the previous
                # sample's last token; unpacked, position 0 is never a target either
                batch["labels"][b, pos] = IGNORE_INDEX
                batch["position_ids"][b, pos:pos + n] = torch.arange(n)
                batch["segment_ids"][b, pos:pos + n] = seg
            pos += n
    return batch


def batch_examples(examples, batch_size, *, pad_id, mode="bucket", max_length=None, seed=0,
                   shuffle=True, indices=False, by_length=True):
    """Groups tokenized examples into padded batches, deterministically for a seed.

    Args:
        examples: {"input_ids", "labels"} dicts as from `tokenize_rows`.
        batch_size: rows per batch.
        pad_id: id written into padding positions (their labels are -100, mask 0).
        mode: "bucket" batches examples of similar length, one example per row; "pack" puts
            several examples into each row of at most `max_length` tokens, with `position_ids`
            restarting at 0 and `segment_ids` 1..k per example (0 = padding) so attention stays
            inside each example.
        max_length: row length for "pack" (required); for "bucket" an optional check.
        seed: seeds a local random.Random; global RNG state is neither used nor changed.
        shuffle: randomize example and batch order; False keeps a fixed order.
        indices: return each batch's example indices (into `examples`) instead of its tensors.
        by_length: "bucket" groups examples of similar length (True) or cuts the shuffled
            examples into batches as they come (False: random batches, more padding).

    Returns:
        List of dicts of (B, T) long tensors: input_ids, labels, attention_mask, and for
        "pack" also position_ids and segment_ids; with `indices`, lists of example indices.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if mode not in ("bucket", "pack"):
        raise ValueError(f"mode must be 'bucket' or 'pack', got {mode!r}")
    if mode == "pack" and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"mode='pack' needs max_length, a positive int, got {max_length!r}")
    _check_examples(examples, max_length)
    rng = random.Random(seed)
    lengths = [len(ex["input_ids"]) for ex in examples]
    if mode == "bucket":
        groups = _bucket_groups(lengths, batch_size, rng, shuffle, by_length)
        if indices:
            return [list(g) for g in groups]
        return [_collate([[examples[i]] for i in g], pad_id, packed=False) for g in groups]
    rows = _pack_rows(lengths, max_length, rng, shuffle)
    if indices:
        return [[i for row in rows[j:j + batch_size] for i in row] for j in range(0, len(rows), batch_size)]
    return [_collate([[examples[i] for i in row] for row in rows[j:j + batch_size]], pad_id, packed=True)
            for j in range(0, len(rows), batch_size)]


def padding_efficiency(batches: list[dict]) -> float:
    """Share of real tokens among all (B, T) slots of the batches, in (0, 1]."""
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["attention_mask"].numel() for b in batches)
    if slots == 0:
        raise ValueError("padding_efficiency: no batches")
    return real / slots


def check_examples(examples, name: str) -> None:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError(f"{name} must be a non-empty list of examples, got "
                         f"{'an empty list' if isinstance(examples, (list, tuple)) else type(examples).__name__}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "input_ids" not in ex or "labels" not in ex:
            raise ValueError(f"{name}[{i}] must be a dict with 'input_ids' and 'labels'")
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(f"{name}[{i}]: input_ids has {len(ex['input_ids'])} tokens but labels "
                             f"has {len(ex['labels'])}")
