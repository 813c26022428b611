"""Perplexity by context length: held-out text scored in windows of each length, overall and per
position bucket.

The texts are joined into one token stream (each text BOS + its tokens) and cut, for every length
L, into consecutive windows of exactly L tokens; every token of a window after its first is
scored with the window before it as context. A model that uses a longer context scores lower
perplexity at longer L and in the later position buckets of a window; a model pushed past the
positions it was trained on (or badly scaled RoPE) scores higher there (the evaluation of
LongLoRA, Chen et al. 2023, and of ALiBi, Press et al. 2022).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

from minift.checks import check_int
from minift.evaluation.png import line_plot
from minift.objectives.loss import supports_chunked_loss


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(B, T - 1) float32 negative log-likelihood of ids[:, 1:] given the tokens before each.

    With an lm_head (minift's Llama) the head runs ``chunk`` positions at a time, so the
    (B, T, V) logits of a long window never exist at once.
    """
    if supports_chunked_loss(model):
        hidden = model(ids, return_hidden=True)[:, :-1]  # (B, T - 1, H)
        parts = [F.cross_entropy(model.lm_head(hidden[:, s:s + chunk]).float().transpose(1, 2),
                                 ids[:, s + 1:s + 1 + chunk], reduction="none")
                 for s in range(0, hidden.shape[1], chunk)]
        return torch.cat(parts, dim=1)
    logits = model(ids)[:, :-1].float()  # (B, T - 1, V)
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


@dataclasses.dataclass
class PerplexityCurve:
    """Per length: scored tokens, mean NLL, perplexity and the perplexity of each position bucket
    (bucket b of a length-L window holds positions [b * L / buckets, (b + 1) * L / buckets))."""
    lengths: list
    windows: list
    tokens: list
    loss: list
    perplexity: list
    bucket_perplexity: list  # per length, one per bucket
    buckets: int

    def table(self) -> str:
        head = (f"{'tokens':>8}{'windows':>9}{'scored':>9}{'ppl':>10}   ppl by position bucket "
                f"(1/{self.buckets} of the window each)")
        rows = [f"{n:>8}{w:>9}{t:>9}{p:>10.3f}   " + " ".join(f"{b:8.3f}" for b in bs)
                for n, w, t, p, bs in zip(self.lengths, self.windows, self.tokens, self.perplexity,
                                          self.bucket_perplexity)]
        return "\n".join(["perplexity by context length", head, *rows])

    def save_png(self, path) -> Path:
        """A line plot: x the token position (each bucket's middle), y the bucket's perplexity,
        one line per length, on a logarithmic y axis."""
        series = {str(n): ([(b + 0.5) * n / self.buckets for b in range(self.buckets)], bs)
                  for n, bs in zip(self.lengths, self.bucket_perplexity)}
        return line_plot(series, "PERPLEXITY BY POSITION", "TOKEN POSITION", "PPL (LOG SCALE)",
                         log_y=True).save(path)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _stream(tokenizer, texts) -> list:
    if isinstance(texts, str) or not texts:
        raise ValueError("perplexity_by_length: texts must be a non-empty list of strings")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"perplexity_by_length: texts[{i}] must be a string, got {type(text).__name__}")
        out += bos + tokenizer.encode(text)
    return out


def perplexity_by_length(model, tokenizer, texts: Sequence[str], lengths: Sequence[int], *,
                         buckets: int = 4, max_windows: Optional[int] = None, batch_size: int = 1,
                         chunk: int = 1024, bf16: bool = False,
                         device: Optional[torch.device] = None) -> PerplexityCurve:
    """Perplexity of ``texts`` in windows of each of ``lengths`` tokens.

    Args:
        model: a minift ``Llama`` or any module mapping (B, T) ids to logits.
        tokenizer: a `minift.models.tokenizer.Tokenizer`.
        texts: held-out plain texts (see `minift.evaluation.forgetting.load_texts`).
        lengths: window lengths in tokens (each at least 2 and at most the stream's length).
        buckets: position buckets per window (at most the shortest length - 1).
        max_windows: windows scored per length at most (default: all that fit).
        batch_size: windows per forward.
        chunk: positions per lm_head call (see `token_nll`).
        bf16: run the forward under bfloat16 autocast.
        device: where the ids go; default the model's.

    Returns:
        A `PerplexityCurve` with ``table()``, ``save_png(path)`` and ``as_dict()``.
    """
    if isinstance(lengths, int) or not lengths:
        raise ValueError(f"perplexity_by_length: lengths must be a non-empty list of token counts, "
                         f"got {lengths!r}")
    lengths = [check_int("perplexity_by_length: lengths", n, minimum=2) for n in lengths]
    buckets = check_int("perplexity_by_length: buckets", buckets)
    if buckets > min(lengths) - 1:
        raise ValueError(f"perplexity_by_length: buckets={buckets} is more than the {min(lengths) - 1} "
                         f"scored positions of the shortest length")
    if max_windows is not None:
        check_int("perplexity_by_length: max_windows", max_windows)
    check_int("perplexity_by_length: batch_size", batch_size)
    stream = _stream(tokenizer, texts)
    if max(lengths) > len(stream):
        raise ValueError(f"perplexity_by_length: lengths: {max(lengths)} tokens is longer than the "
                         f"texts ({len(stream)} tokens); give more text or shorter lengths")
    device = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    was = model.training
    model.eval()
    curve = PerplexityCurve(lengths, [], [], [], [], [], buckets)
    try:
        for n in lengths:
            count = len(stream) // n if max_windows is None else min(len(stream) // n, max_windows)
            windows = torch.tensor(stream[:count * n]).view(count, n)
            nll = torch.cat([_nll(model, windows[s:s + batch_size].to(device), chunk, bf16)
                             for s in range(0, count, batch_size)])  # (count, n - 1)
            positions = torch.arange(1, n)  # the position of each scored token
            bucket = positions * buckets // n
            curve.windows.append(count)
            curve.tokens.append(nll.numel())
            curve.loss.append(float(nll.mean()))
            curve.perplexity.append(math.exp(min(curve.loss[-1], 50.0)))
            curve.bucket_perplexity.append([math.exp(min(float(nll[:, bucket == b].mean()), 50.0))
                                            for b in range(buckets)])
    finally:
        model.train(was)
    return curve


def _nll(model, ids, chunk, bf16):
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        return token_nll(model, ids, chunk).float().cpu()
