"""Rule rewards for GRPO: each is a reward_fn(prompts, completions, rows) -> list[float] over text
completions, and ``combine`` adds weighted rewards into one.

    reward = combine(exact_match(), (length_penalty(64), 0.1))
    minift.train(model, prompts, TrainConfig(objective="grpo"), reward_fn=reward, tokenizer=tok)
"""
from __future__ import annotations

import json
import re
from typing import Callable, Sequence, Union

from minift.checks import check_int

Reward = Callable[[Sequence, Sequence[str], Sequence[dict]], list]


def exact_match(key: str = "answer", strip: bool = True) -> Reward:
    """1.0 where the completion equals ``row[key]`` (both stripped of surrounding white space
    with ``strip``), else 0.0; a row without ``key`` is a clear error."""
    def reward(prompts, completions, rows):
        out = []
        for i, (c, row) in enumerate(zip(completions, rows)):
            if key not in row:
                raise ValueError(f"exact_match: row {i} has no {key!r} to compare with")
            want = str(row[key])
            out.append(float(c.strip() == want.strip() if strip else c == want))
        return out
    return reward


def regex_match(pattern: str, flags: int = 0) -> Reward:
    """1.0 where ``pattern`` matches somewhere in the completion (re.search), else 0.0."""
    compiled = re.compile(pattern, flags)
    return lambda prompts, completions, rows: [float(compiled.search(c) is not None) for c in completions]


def json_parses() -> Reward:
    """1.0 where the whole completion is valid JSON, else 0.0."""
    def parses(text: str) -> float:
        try:
            json.loads(text)
        except ValueError:
            return 0.0
        return 1.0
    return lambda prompts, completions, rows: [parses(c) for c in completions]


def length_penalty(max_chars: int) -> Reward:
    """-(characters beyond ``max_chars``) / max_chars: 0 up to the limit, -1 at twice it."""
    max_chars = check_int("length_penalty max_chars", max_chars)
    return lambda prompts, completions, rows: [-max(len(c) - max_chars, 0) / max_chars for c in completions]


def combine(*parts: Union[Reward, tuple]) -> Reward:
    """The weighted sum of rewards: each part is a reward (weight 1) or (reward, weight)."""
    weighted = [p if isinstance(p, tuple) else (p, 1.0) for p in parts]
    if not weighted or not all(callable(f) and isinstance(w, (int, float)) for f, w in weighted):
        raise ValueError("combine takes rewards or (reward, weight) pairs")

    def reward(prompts, completions, rows):
        total = [0.0] * len(completions)
        for f, w in weighted:
            total = [t + w * float(r) for t, r in zip(total, f(prompts, completions, rows))]
        return total
    return reward
