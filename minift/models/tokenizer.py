"""Tokenizers from Hugging Face checkpoint folders: tokenizer.json + tokenizer_config.json.

The vocabulary and the text <-> id mapping come from tokenizer.json through the `tokenizers`
library; tokenizer_config.json and special_tokens_map.json say which tokens are BOS/EOS/PAD/UNK,
whether encoding adds BOS, and carry the chat template.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _BackendTokenizer

from minift.files import atomic_write, read_json, write_json
from minift.models import chat_templates

_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_content(value, where):
    """Special tokens are written as "<s>" or as {"content": "<s>", ...}."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: a special token must be a string or have a string 'content', got {value!r}")


def _pick_template(value, where):
    """A config holds one template string or a list of {"name", "template"}; use "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
        raise ValueError(f"{where}: chat_template lists {sorted(map(str, named))} but no 'default'")
    raise ValueError(f"{where}: chat_template must be a string or a list of named templates")


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special tokens and a chat template.

    Build it with `load_tokenizer`. Attributes: `bos_token`, `eos_token`, `unk_token`,
    `pad_token` (strings or None), their `*_id`s, `chat_template` (jinja2 source),
    `add_bos_token`, `add_eos_token`, `vocab_size`.
    """

    def __init__(self, backend, special, chat_template, add_bos_token=None, add_eos_token=None,
                 extra_special_tokens=()):
        self.backend = backend
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        self.unk_token = special.get("unk_token")
        self.pad_token = special.get("pad_token")
        self.extra_special_tokens = list(extra_special_tokens)
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._ensure_tokens_exist()
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor()
        self.chat_template = chat_template

    def _ensure_tokens_exist(self):
        # A config may name a special token the vocabulary lacks; like the reference loaders we
        # add it, so its id is stable and it never splits into pieces.
        names = [getattr(self, r) for r in _ROLES] + self.extra_special_tokens
        missing = [t for t in names if t is not None and self.backend.token_to_id(t) is None]
        if missing:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                             for t in dict.fromkeys(missing)])

    def _set_post_processor(self):
        # Llama tokenizers rebuild the post-processor from add_bos_token / add_eos_token when the
        # config states them, so `encode(text, add_special_tokens=True)` follows the config.
        add_bos = bool(self.add_bos_token) and self.bos_token is not None
        add_eos = bool(self.add_eos_token) and self.eos_token is not None
        single = (f"{self.bos_token}:0 " if add_bos else "") + "$A:0" + (f" {self.eos_token}:0" if add_eos else "")
        pair = single + (f" {self.bos_token}:1" if add_bos else "") + " $B:1" + (f" {self.eos_token}:1" if add_eos else "")
        special = [(t, self.backend.token_to_id(t)) for t, on in
                   ((self.bos_token, add_bos), (self.eos_token, add_eos)) if on]
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                    special_tokens=special)

    @property
    def chat_template(self) -> Optional[str]:
        return self._chat_template

    @chat_template.setter
    def chat_template(self, source: Optional[str]) -> None:
        self._chat_template = source
        self._compiled = chat_templates.compile_template(source) if source is not None else None

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a token string, or None when the vocabulary has no such token."""
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.eos_token)

    @property
    def unk_token_id(self) -> Optional[int]:
        return self.token_to_id(self.unk_token)

    @property
    def pad_token_id(self) -> Optional[int]:
        """PAD's id; checkpoints without a PAD token (Llama) pad with EOS, masked out anyway."""
        pad = self.token_to_id(self.pad_token)
        return pad if pad is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self):
        return self.vocab_size

    @property
    def special_tokens(self) -> dict:
        """Role -> token string for every special token that is set (what templates see)."""
        out = {r: getattr(self, r) for r in _ROLES if getattr(self, r) is not None}
        if self.extra_special_tokens:
            out["additional_special_tokens"] = list(self.extra_special_tokens)
        return out

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> token ids.

        Args:
            text: the string to encode. Special-token strings in it map to their ids.
            add_special_tokens: add BOS/EOS as the tokenizer's post-processor says. Off by
                default because chat templates already write BOS themselves.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and (start, end) character offsets of each token in `text`, no special tokens added."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Token ids -> text.

        Args:
            ids: a sequence of ints (a list or a 1-D tensor).
            skip_special_tokens: leave out BOS/EOS/PAD and other special tokens.
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False) -> str | list[int]:
        """Renders a conversation with the chat template.

        Args:
            messages: list of {"role": ..., "content": ...} dicts.
            add_generation_prompt: append the header that opens the assistant's turn.
            tokenize: return token ids (encoded without added special tokens, since the
                template writes them) instead of the string.

        Raises:
            ValueError: when there is no template, or the template raises an error.
        """
        if self._compiled is None:
            raise ValueError("this tokenizer has no chat template; pass chat_template= to load_tokenizer")
        text = chat_templates.render(self._compiled, messages, add_generation_prompt, self.special_tokens)
        return self.encode(text) if tokenize else text

    def save(self, path: str | os.PathLike) -> None:
        """Writes tokenizer.json and tokenizer_config.json into the folder `path`.

        The files load back with `load_tokenizer` and with transformers' AutoTokenizer.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        # each file through a temporary one renamed over it: a kill mid-save leaves the old file
        # or the new one, never a truncated tokenizer.json beside a saved model
        atomic_write(path / "tokenizer.json", lambda tmp: self.backend.save(tmp))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
        config.update(self.special_tokens)
        for key in ("add_bos_token", "add_eos_token"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                     "normalized": t.normalized, "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.backend.get_added_tokens_decoder().items())}
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(path / "tokenizer_config.json", config, ensure_ascii=False)


def _special_tokens(config, config_file, tokens_map, map_file):
    """Role -> token string; tokenizer_config.json wins, special_tokens_map.json fills the gaps."""
    special = {}
    for role in _ROLES:
        if config.get(role) is not None:
            special[role] = _token_content(config[role], f"{config_file}: {role}")
        elif tokens_map.get(role) is not None:
            special[role] = _token_content(tokens_map[role], f"{map_file}: {role}")
    extra = []
    for source, where in ((config, config_file), (tokens_map, map_file)):
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(source.get(key), list):
                extra += [_token_content(t, f"{where}: {key}") for t in source[key]]
    return special, list(dict.fromkeys(extra))


def _resolve_template(path, config, config_file, chat_template, vocab):
    """The template to use: an explicit argument, else the checkpoint's, else a built-in."""
    if chat_template is not None:
        if chat_template in chat_templates.BUILTIN_TEMPLATES:
            return chat_templates.BUILTIN_TEMPLATES[chat_template]
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template
        raise ValueError(f"chat_template={chat_template!r} is neither jinja2 source nor one of the "
                         f"built-in templates {sorted(chat_templates.BUILTIN_TEMPLATES)}")
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():  # newer transformers save the template in its own file
        return jinja_file.read_text(encoding="utf-8")
    found = _pick_template(config.get("chat_template"), config_file)
    if found is not None:
        return found
    return chat_templates.BUILTIN_TEMPLATES[chat_templates.default_template_name(vocab)]


def load_tokenizer(path: str | os.PathLike, chat_template: Optional[str] = None) -> Tokenizer:
    """Loads the tokenizer of a Hugging Face checkpoint folder.

    Args:
        path: folder holding tokenizer.json and, usually, tokenizer_config.json (optionally
            special_tokens_map.json and chat_template.jinja); or a .gguf file with a byte-level
            BPE tokenizer in its metadata (minift.models.gguf_tokenizer).
        chat_template: None to use the checkpoint's template (tokenizer_config.json or
            chat_template.jinja), falling back to a built-in picked from the vocabulary
            ("llama-3" if it has <|start_header_id|>/<|eot_id|>, "chatml" if <|im_start|>/
            <|im_end|>, "llama-2" if [INST], else "alpaca"); or a built-in name ("llama-3",
            "chatml", "llama-2", "alpaca"), or jinja2 source, which replaces the checkpoint's.

    Raises:
        FileNotFoundError: the folder or its tokenizer.json is missing.
        ValueError: a JSON file is malformed (file and line named), a special token or the
            template is malformed.
    """
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():  # the tokenizer in a llama.cpp file's metadata
        from minift.models.gguf_tokenizer import load_gguf_tokenizer  # imports this module
        return load_gguf_tokenizer(path, chat_template)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"tokenizer.json not found: {tokenizer_file}")
    try:
        backend = _BackendTokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # the Rust library raises a bare Exception on bad files
        raise ValueError(f"{tokenizer_file}: cannot be read as a tokenizers file ({err})") from err
    config_file, map_file = path / "tokenizer_config.json", path / "special_tokens_map.json"
    config = read_json(config_file) if config_file.is_file() else {}
    tokens_map = read_json(map_file) if map_file.is_file() else {}
    for name, data in ((config_file, config), (map_file, tokens_map)):
        if not isinstance(data, dict):
            raise ValueError(f"{name}: expected a JSON object, got {type(data).__name__}")
    special, extra = _special_tokens(config, config_file, tokens_map, map_file)
    template = _resolve_template(path, config, config_file, chat_template, backend.get_vocab())
    return Tokenizer(backend, special, template, add_bos_token=config.get("add_bos_token"),
                     add_eos_token=config.get("add_eos_token"), extra_special_tokens=extra)
