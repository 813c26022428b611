"""Tokenizers in GGUF metadata: read a byte-level BPE ("gpt2") vocabulary, and write one back.

A GGUF file holds the tokenizer as `tokenizer.ggml.*` metadata: the tokens by id, their types
(1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte), the merges as "a b" strings,
the special ids, add_bos / add_eos, the chat template, and under `tokenizer.ggml.pre` the name of
the rule that splits text into words before the merges apply. Byte-level BPE vocabularies
(Llama 3, Qwen2, SmolLM, GPT-2) are rebuilt as a `tokenizers` BPE with those splits; SentencePiece
vocabularies ("llama": Llama 2, Mistral v0.1) are not read yet.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _BackendTokenizer

from minift.gguf.format import ARRAY, INT32, STRING, UINT32, Field, GGUFFile, read_gguf
from minift.models.tokenizer import Tokenizer, _resolve_template

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# the word splits llama.cpp applies before the merges, by the name it stores
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (regexes applied in turn, ignore_merges: a word found whole in the vocabulary is one token)
PRE_TOKENIZERS = {
    "gpt2": ((_GPT2,), False),
    "smollm": ((r"\p{N}", _GPT2), False), "starcoder": ((r"\p{N}", _GPT2), False),
    "refact": ((r"\p{N}", _GPT2), False),
    "llama-bpe": ((_LLAMA3,), True), "llama3": ((_LLAMA3,), True), "llama-v3": ((_LLAMA3,), True),
    "smaug-bpe": ((_LLAMA3,), True), "falcon3": ((_LLAMA3,), True),
    "qwen2": ((_QWEN2,), False), "deepseek-r1-qwen": ((_QWEN2,), False),
}


def _meta(f: GGUFFile, key: str, kind, required: bool = True):
    value = f.metadata.get(key)
    if value is None and required:
        raise ValueError(f"{f.path}: metadata {key!r} is missing")
    if value is not None and not isinstance(value, kind):
        raise ValueError(f"{f.path}: metadata {key!r} has the wrong type ({type(value).__name__})")
    return value


def _pre_tokenizer(regexes: tuple[str, ...]):
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    return pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def load_gguf_tokenizer(path, chat_template: Optional[str] = None) -> Tokenizer:
    """The tokenizer a GGUF file's metadata describes (see `minift.load_tokenizer`)."""
    f = read_gguf(path)
    kind = _meta(f, "tokenizer.ggml.model", str)
    if kind != "gpt2":
        raise ValueError(f"{f.path}: tokenizer.ggml.model is {kind!r}; minift reads only byte-level BPE "
                         f"('gpt2') tokenizers from GGUF files so far")
    pre = _meta(f, "tokenizer.ggml.pre", str)
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{f.path}: tokenizer.ggml.pre {pre!r} is not a known pre-tokenizer; known: "
                         f"{', '.join(sorted(PRE_TOKENIZERS))}")
    tokens = _meta(f, "tokenizer.ggml.tokens", list)
    types = _meta(f, "tokenizer.ggml.token_type", list, required=False) or [NORMAL] * len(tokens)
    merges = _meta(f, "tokenizer.ggml.merges", list)
    if len(types) != len(tokens):
        raise ValueError(f"{f.path}: {len(types)} token types for {len(tokens)} tokens")
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2:
            raise ValueError(f"{f.path}: tokenizer.ggml.merges[{i}] is {merge!r}, not two tokens "
                             f"separated by one space")
        pairs.append(tuple(parts))
    regexes, ignore_merges = PRE_TOKENIZERS[pre]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = _BackendTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = _pre_tokenizer(regexes)
    backend.decoder = decoders.ByteLevel()
    # control tokens (<|im_start|>) and user-defined ones match whole, never split by the merges
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if k == CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, types) if k == USER_DEFINED])
    special = {}
    for role, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        token_id = _meta(f, f"tokenizer.ggml.{key}_token_id", int, required=False)
        if token_id is not None:
            if not 0 <= token_id < len(tokens):
                raise ValueError(f"{f.path}: tokenizer.ggml.{key}_token_id {token_id} is not a token id "
                                 f"(the vocabulary has {len(tokens)})")
            special[role] = tokens[token_id]
    stored = _meta(f, "tokenizer.chat_template", str, required=False)
    # resolved as for folders: the argument, else the file's, else a built-in for the vocabulary
    template = _resolve_template(Path(f.path), {"chat_template": stored}, f.path, chat_template,
                                 backend.get_vocab())
    return Tokenizer(backend, special, template,
                     add_bos_token=_meta(f, "tokenizer.ggml.add_bos_token", bool, required=False),
                     add_eos_token=_meta(f, "tokenizer.ggml.add_eos_token", bool, required=False))


def _pre_name(data: dict, where: str) -> str:
    """The llama.cpp pre-tokenizer name of a tokenizer.json pre_tokenizer, from the regexes it
    applies; ValueError when it is none of PRE_TOKENIZERS."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes = []
    for step in steps:
        kind = step.get("type")
        if kind == "Digits" and step.get("individual_digits"):
            regexes.append(r"\p{N}")
        elif kind == "Split" and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"]:
            regexes.append(step["pattern"]["Regex"])
        elif kind == "ByteLevel":
            regexes += [_GPT2] if step.get("use_regex", True) else []
        else:
            regexes.append(f"<{kind}>")  # matches no entry below
    for name, (known, _) in PRE_TOKENIZERS.items():
        if tuple(regexes) == known:
            return name
    raise ValueError(f"{where}: its pre-tokenizer (splits {regexes}) matches none llama.cpp knows by "
                     f"name here ({', '.join(sorted(PRE_TOKENIZERS))}); it cannot be written to GGUF")


def gguf_tokenizer_metadata(tok: Tokenizer, vocab_size: int, where: str = "tokenizer") -> dict:
    """The `tokenizer.*` GGUF metadata of a byte-level BPE tokenizer, padded to the model's
    `vocab_size` with "[PAD<id>]" tokens of type UNUSED (as llama.cpp's converter pads)."""
    data = json.loads(tok.backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{where}: only byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, GPT-2) are "
                         f"written to GGUF so far; this one is {model.get('type')} with decoder "
                         f"{(data.get('decoder') or {}).get('type')}")
    if data.get("normalizer") not in (None, {"type": "NFC"}):
        raise ValueError(f"{where}: a {data['normalizer'].get('type')} normalizer has no GGUF equivalent")
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"{where}: token id {max(by_id)} does not fit the model's vocab_size {vocab_size}")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(UNUSED if i not in by_id else NORMAL if i not in added
                     else CONTROL if added[i].special else USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": _pre_name(data, where),
            "tokenizer.ggml.tokens": Field(tokens, ARRAY, STRING),
            "tokenizer.ggml.token_type": Field(types, ARRAY, INT32),
            "tokenizer.ggml.merges": Field(merges, ARRAY, STRING)}
    for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unknown", tok.unk_token_id),
                       ("padding", tok.token_to_id(tok.pad_token))):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = Field(value, UINT32)
    for key in ("add_bos_token", "add_eos_token"):
        if getattr(tok, key) is not None:
            meta[f"tokenizer.ggml.{key}"] = bool(getattr(tok, key))
    if tok.chat_template is not None:
        meta["tokenizer.chat_template"] = tok.chat_template
    return meta
