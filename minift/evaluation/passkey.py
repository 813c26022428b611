"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"; LongLoRA's long-context
check): a random number is hidden at a chosen depth of long filler text and the
model is asked for it at the end. Accuracy over a grid of prompt lengths (in tokens) x depths
says up to which length, and where in the context, a model still finds what it read.

A prompt, token by token (its length is exact; the pieces are tokenized apart and joined)::

    [BOS] INTRO | filler ... | NEEDLE(key) | filler ... | QUESTION        -> answer " <key>"

The filler is our own five short sentences (FILLER) repeated in order and cut to the exact length
(so its last sentence may stop mid-way, before the question). The needle goes in at the sentence
boundary nearest to depth x the filler's tokens (the filler's start and end count as boundaries),
so its place is off by at most half the longest sentence. Depth 0 puts the key just after the
intro, depth 1 just before the question.
"""
from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from minift.checks import check_int
from minift.evaluation.png import heatmap
from minift.models.generation import generate
from minift.objectives.loss import supports_chunked_loss

INTRO = "A pass key is hidden in the text below. Find it and remember it."
FILLER = ("The river runs down to the sea.", "Birds sing at dawn.", "The road goes on and on.",
          "Stones rest by the old path.", "Night follows day, and day follows night.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
METHODS = ("generate", "score")


@dataclasses.dataclass
class PasskeyPrompt:
    """One prompt: ``ids`` (exactly the asked length), where the needle's tokens are, and the
    answer's token ids (" <key>")."""
    ids: list
    key: str
    needle_start: int  # index of the needle's first token in ids
    needle_end: int  # one past its last
    answer_ids: list


def _pieces(tokenizer, intro: str, question: str):
    encode = tokenizer.encode
    head = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + \
        (encode(intro) if intro else [])
    return head, [encode(" " + s) for s in FILLER], encode(question)


def _check_texts(intro, needle, question) -> None:
    for name, text in (("intro", intro), ("needle", needle), ("question", question)):
        if not isinstance(text, str):
            raise ValueError(f"passkey: {name} must be a string, got {text!r}")
    if "{key}" not in needle:
        raise ValueError(f"passkey: needle must contain '{{key}}', got {needle!r}")
    if not question:
        raise ValueError("passkey: question must not be empty")


def _filler(sentences, n: int) -> tuple[list, list]:
    """The first n tokens of the sentences repeated in order, and the places (token offsets) a
    needle may go: every sentence boundary, the start and the end."""
    ids, places = [], [0]
    while len(ids) < n:
        ids += sentences[(len(places) - 1) % len(sentences)]
        places.append(len(ids))
    return ids[:n], [p for p in places if p < n] + [n]


def passkey_prompt(tokenizer, length: int, depth: float, key: str, *, intro: str = INTRO,
                   needle: str = NEEDLE, question: str = QUESTION) -> PasskeyPrompt:
    """The passkey prompt of exactly ``length`` tokens with ``key`` at ``depth`` (0..1) of the filler.

    ``intro``, ``needle`` (a text with ``{key}``) and ``question`` replace the default texts, e.g.
    shorter ones for a model trained on short windows (the defaults take 108 tokens with the
    example tokenizer); ``intro`` may be empty.

    Raises:
        ValueError naming the field: a length shorter than the prompt without filler, a depth
        outside [0, 1], a key that is not digits, a needle without ``{key}``, an empty question.
    """
    length = check_int("passkey: length", length)
    depth = _check_depth(depth)
    if not (isinstance(key, str) and key.isdigit()):
        raise ValueError(f"passkey: key must be a string of digits, got {key!r}")
    _check_texts(intro, needle, question)
    head, sentences, question = _pieces(tokenizer, intro, question)
    needle = tokenizer.encode(needle.format(key=key))
    n_fill = length - len(head) - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"passkey: length {length} is shorter than the prompt without filler "
                         f"({length - n_fill} tokens with this tokenizer)")
    filler, places = _filler(sentences, n_fill)
    cut = min(places, key=lambda p: abs(p - depth * n_fill))  # the boundary nearest the depth
    ids = head + filler[:cut] + needle + filler[cut:] + question
    start = len(head) + cut
    return PasskeyPrompt(ids=ids, key=key, needle_start=start, needle_end=start + len(needle),
                         answer_ids=tokenizer.encode(" " + key))


def _check_depth(depth) -> float:
    if isinstance(depth, bool) or not isinstance(depth, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"passkey: each depth must be a number in [0, 1], got {depth!r}")
    return float(depth)


# ---- the grid ----------------------------------------------------------------------------
@dataclasses.dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    needle_start: int
    reply: str  # generate: the decoded new tokens; score: the argmax tokens decoded
    correct: bool


@dataclasses.dataclass
class PasskeyResult:
    """The trials of `passkey_grid`; ``accuracy`` is computed from them."""
    lengths: list
    depths: list
    trials: list  # PasskeyTrial
    method: str

    @property
    def accuracy(self) -> np.ndarray:
        """(len(lengths), len(depths)) fraction of correct trials per cell."""
        acc = np.full((len(self.lengths), len(self.depths)), np.nan)
        for i, length in enumerate(self.lengths):
            for j, depth in enumerate(self.depths):
                cell = [t.correct for t in self.trials if t.length == length and t.depth == depth]
                if cell:
                    acc[i, j] = sum(cell) / len(cell)
        return acc

    def table(self) -> str:
        """Accuracy as text: one row per length, one column per depth."""
        per_cell = len(self.trials) // max(1, len(self.lengths) * len(self.depths))
        head = "tokens \\ depth" + "".join(f"{f'{100 * d:.0f}%':>7}" for d in self.depths) + "   mean"
        rows = [f"{length:>14}" + "".join(f"{a:>7.2f}" for a in accs) + f"{np.nanmean(accs):>7.2f}"
                for length, accs in zip(self.lengths, self.accuracy)]
        return "\n".join([f"passkey retrieval accuracy ({per_cell} trials per cell, {self.method})",
                          head, *rows])

    def save_png(self, path) -> Path:
        """A heatmap PNG: rows are lengths (tokens), columns depths (%), each cell's accuracy in %."""
        return heatmap(self.accuracy, [str(n) for n in self.lengths],
                       [f"{100 * d:.0f}%" for d in self.depths], "PASSKEY ACCURACY (%)",
                       "DEPTH OF THE KEY", "TOKENS").save(path)

    def as_dict(self) -> dict:
        return {"lengths": list(self.lengths), "depths": list(self.depths), "method": self.method,
                "accuracy": [[None if np.isnan(a) else float(a) for a in row] for row in self.accuracy],
                "trials": [dataclasses.asdict(t) for t in self.trials]}


def _check_grid(lengths, depths, trials, digits, method, batch_size):
    if isinstance(lengths, (int, np.integer)) or not lengths:
        raise ValueError(f"passkey: lengths must be a non-empty list of token counts, got {lengths!r}")
    lengths = [check_int("passkey: lengths", n) for n in lengths]
    if isinstance(depths, (int, float)) or not depths:
        raise ValueError(f"passkey: depths must be a non-empty list of numbers in [0, 1], got {depths!r}")
    depths = [_check_depth(d) for d in depths]
    check_int("passkey: trials", trials)
    check_int("passkey: batch_size", batch_size)
    if check_int("passkey: digits", digits) > 18:
        raise ValueError(f"passkey: digits must be at most 18, got {digits}")
    if method not in METHODS:
        raise ValueError(f"passkey: method must be one of {', '.join(METHODS)}, got {method!r}")
    return lengths, depths


def _device_of(model) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def _last_logits(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n, V) logits of the last n positions; with an lm_head, only those go through it."""
    if supports_chunked_loss(model):
        hidden = model(ids, return_hidden=True)[:, -n:]
        return model.lm_head(hidden)
    return model(ids)[:, -n:]


def _run_cell(model, tokenizer, prompts, method, device, batch_size) -> list:
    """(reply, correct) of each prompt of one cell (all of one length)."""
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        if method == "generate":
            ids = torch.tensor([p.ids for p in chunk], device=device)
            new = max(len(p.answer_ids) for p in chunk) + 2
            gen = generate(model, ids, max_new_tokens=new, eos_token_id=tokenizer.eos_token_id)
            for p, row in zip(chunk, gen[:, ids.shape[1]:].tolist()):
                reply = tokenizer.decode(row)
                found = re.search(r"\d+", reply)
                out.append((reply, found is not None and found.group() == p.key))
            continue
        for p in chunk:  # score: teacher-forced prompt + answer; each answer token must be the argmax
            n = len(p.answer_ids)
            ids = torch.tensor([p.ids + p.answer_ids[:-1]], device=device)
            best = _last_logits(model, ids, n).argmax(-1)[0].tolist()
            out.append((tokenizer.decode(best), best == p.answer_ids))
    return out


def passkey_grid(model, tokenizer, lengths: Sequence[int],
                 depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), trials: int = 5, seed: int = 0, *, digits: int = 5, method: str = "generate",
                 batch_size: int = 4, device: Optional[torch.device] = None, intro: str = INTRO,
                 needle: str = NEEDLE, question: str = QUESTION) -> PasskeyResult:
    """Passkey retrieval accuracy of ``model`` over ``lengths`` x ``depths``.

    Args:
        model: a minift ``Llama`` (plain, LoRA-wrapped, NF4) or any module mapping (B, T) ids to
            logits that `minift.generate` can drive.
        tokenizer: a `minift.models.tokenizer.Tokenizer` (encode, decode, bos/eos ids).
        lengths: prompt lengths in tokens (exact).
        depths: where the key sits, as fractions of the filler (0: first, 1: last).
        trials: prompts per cell, each with its own random key.
        seed: seeds the keys (``random.Random(seed)``), so two models see the same prompts.
        digits: digits of each key (the first is never 0).
        method: "generate" (greedy decoding; correct when the first run of digits in the reply
            is the key) or "score" (one teacher-forced forward; correct when every token of
            " <key>" is the argmax after the tokens before it).
        batch_size: prompts per forward.
        device: where the ids go; default the model's.
        intro, needle, question: the prompt's texts (`passkey_prompt`); default the module's
            INTRO, NEEDLE and QUESTION.

    Returns:
        A `PasskeyResult`: ``accuracy`` (lengths x depths), ``table()``, ``save_png(path)``,
        ``as_dict()`` and every trial with its key and the model's reply.
    """
    lengths, depths = _check_grid(lengths, depths, trials, digits, method, batch_size)
    _check_texts(intro, needle, question)
    rng = random.Random(seed)
    device = torch.device(device) if device is not None else _device_of(model)
    was = model.training
    model.eval()
    results = []
    try:
        for length in lengths:
            for depth in depths:
                keys = [str(rng.randrange(10 ** (digits - 1), 10 ** digits)) for _ in range(trials)]
                prompts = [passkey_prompt(tokenizer, length, depth, k, intro=intro, needle=needle,
                                          question=question) for k in keys]
                for p, (reply, ok) in zip(prompts, _run_cell(model, tokenizer, prompts, method, device,
                                                             batch_size)):
                    results.append(PasskeyTrial(length, depth, p.key, p.needle_start, reply, bool(ok)))
    finally:
        model.train(was)
    return PasskeyResult(lengths=lengths, depths=depths, trials=results, method=method)
