"""JSONL rows and their formats: reading a file with errors that name file:line, turning a row
of any chat shape (chat, ShareGPT, alpaca, prompt/completion) into messages with known roles,
and tokenizing a raw text row (every token trained)."""
from __future__ import annotations

import os

from minift.files import read_jsonl


def _read_jsonl(path):
    """(line number, row) for each non-blank line; errors name file:line."""
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: empty dataset (no rows)")
    return rows


def load_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a JSONL file into a list of dicts.

    Args:
        path: the file; blank lines are skipped.

    Raises:
        ValueError: a malformed or non-object line (naming file:line), or no rows at all.
    """
    return [row for _, row in _read_jsonl(path)]


def _text_field(row, key, where, optional=False):
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


ROLES = ("system", "user", "assistant")
# ShareGPT's "from" values and the chat roles they stand for
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def _check_roles(messages, where, key="messages", field="role", known=ROLES):
    for i, m in enumerate(messages):
        if m[field] not in known:
            raise ValueError(f"{where}: unknown role {m[field]!r} in {key}[{i}]; "
                             f"{field} must be one of {', '.join(known)}")


def _turns(row, where, field, role_key, text_key) -> list:
    """``row[field]``: a non-empty list of dicts with string ``role_key`` and ``text_key``."""
    turns = row[field]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: '{field}' must be a non-empty list")
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get(role_key), str) \
                or not isinstance(t.get(text_key), str):
            raise ValueError(f"{where}: {field}[{i}] must have string '{role_key}' and '{text_key}'")
    return turns


def _sharegpt(row, where):
    turns = _turns(row, where, "conversations", "from", "value")
    _check_roles(turns, where, "conversations", "from", tuple(SHAREGPT_ROLES))
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def row_to_messages(row: dict, where: str = "<row>") -> list[dict]:
    """Turns one chat row of any supported shape into a list of {"role", "content"} messages.

    Raises:
        ValueError: naming `where` (file:line): an unknown role, a missing or non-string field,
            a row of no known shape. Raw ``{"text": ...}`` rows have no messages (see
            `tokenize_rows`).
    """
    if "messages" in row:
        messages = _turns(row, where, "messages", "role", "content")
        _check_roles(messages, where)
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "conversations" in row:
        return _sharegpt(row, where)
    if "instruction" in row and "output" in row:
        prompt = _text_field(row, "instruction", where)
        extra = _text_field(row, "input", where, optional=True)
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        system = _text_field(row, "system", where, optional=True)
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": prompt},
                       {"role": "assistant", "content": _text_field(row, "output", where)}]
    if "prompt" in row and "completion" in row:
        return [{"role": "user", "content": _text_field(row, "prompt", where)},
                {"role": "assistant", "content": _text_field(row, "completion", where)}]
    raise ValueError(f"{where}: unknown row shape with keys {sorted(row)}; expected 'messages', "
                     "'conversations' (ShareGPT), 'instruction'+'output' (+'input'), "
                     "'prompt'+'completion' or 'text'")


def _tokenize_text(tokenizer, text, where):
    """A raw text row: every token is trained. BOS as the tokenizer adds it; EOS appended so the
    model learns where a document ends."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    if len(ids) < 2:
        raise ValueError(f"{where}: field 'text' is empty")
    return ids, list(ids)
