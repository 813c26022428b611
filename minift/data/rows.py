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


def check_no_nul(text: str, where: str, field: str) -> str:
    """`text` unless it holds a NUL character: JSON allows "\\u0000", but no chat or document
    holds one; it comes from a binary file or a broken export, and it would be trained on."""
    at = text.find("\x00")
    if at >= 0:
        raise ValueError(f"{where}: {field} holds a NUL character (\\u0000) at offset {at}; "
                         f"that is binary data, not text: remove it or fix the export")
    return text


def _text_field(row, key, where, optional=False):
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return check_no_nul(value, where, f"field {key!r}")


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
        check_no_nul(t[text_key], where, f"{field}[{i}].{text_key}")
    return turns


def _sharegpt(row, where):
    turns = _turns(row, where, "conversations", "from", "value")
    _check_roles(turns, where, "conversations", "from", tuple(SHAREGPT_ROLES))
    return ([{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns],
            [f"conversations[{i}].value" for i in range(len(turns))])


def conversation(row: dict, where: str = "<row>") -> tuple[list[dict], list[str]]:
    """`row_to_messages`, plus the field each message came from (``messages[2].content``,
    ``'output'``, ...), for errors that name what to fix in the file."""
    if "messages" in row:
        messages = _turns(row, where, "messages", "role", "content")
        _check_roles(messages, where)
        found = ([{"role": m["role"], "content": m["content"]} for m in messages],
                 [f"messages[{i}].content" for i in range(len(messages))])
    elif "conversations" in row:
        found = _sharegpt(row, where)
    elif "instruction" in row and "output" in row:
        prompt = _text_field(row, "instruction", where)
        extra = _text_field(row, "input", where, optional=True)
        if extra:
            prompt = f"{prompt}\n\n{extra}"
        system = _text_field(row, "system", where, optional=True)
        head = [{"role": "system", "content": system}] if system else []
        found = (head + [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": _text_field(row, "output", where)}],
                 ["'system'"] * len(head) + ["'instruction'", "'output'"])
    elif "prompt" in row and "completion" in row:
        found = ([{"role": "user", "content": _text_field(row, "prompt", where)},
                  {"role": "assistant", "content": _text_field(row, "completion", where)}],
                 ["'prompt'", "'completion'"])
    else:
        raise ValueError(f"{where}: unknown row shape with keys {sorted(row)}; expected 'messages', "
                         "'conversations' (ShareGPT), 'instruction'+'output' (+'input'), "
                         "'prompt'+'completion' or 'text'")
    for m, field in zip(*found):
        if m["role"] == "assistant" and not m["content"].strip():
            # it would train the model to end its turn at once, whatever was asked
            raise ValueError(f"{where}: {field}, an assistant reply, is empty; write the reply, "
                             f"or leave the turn out")
    return found


def row_to_messages(row: dict, where: str = "<row>") -> list[dict]:
    """Turns one chat row of any supported shape into a list of {"role", "content"} messages.

    Raises:
        ValueError: naming `where` (file:line): an unknown role, a missing or non-string field,
            a field holding a NUL character, an empty assistant reply, a row of no known shape.
            Raw ``{"text": ...}`` rows have no messages (see `tokenize_rows`).
    """
    return conversation(row, where)[0]


def only_special_tokens(tokenizer, text: str) -> bool:
    """True when `text` is nothing but special-token strings (and whitespace): "<s></s>",
    "<|eot_id|>". Such text teaches the model no words, only markers in the wrong places."""
    return not tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True).strip()


def _tokenize_text(tokenizer, text, where):
    """A raw text row: every token is trained. BOS as the tokenizer adds it; EOS appended so the
    model learns where a document ends."""
    if not text.strip():
        raise ValueError(f"{where}: field 'text' is empty")
    if only_special_tokens(tokenizer, text):
        raise ValueError(f"{where}: field 'text' holds only special tokens ({text[:80]!r}), no "
                         f"words to train on")
    ids = tokenizer.encode(text, add_special_tokens=True)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    if len(ids) < 2:  # no EOS to append: one token, nothing for it to predict
        raise ValueError(f"{where}: field 'text' is one token, too short to train on")
    return ids, list(ids)
