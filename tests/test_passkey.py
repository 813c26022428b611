"""Passkey retrieval and perplexity by length (minift/evaluation/passkey.py, length_perplexity.py,
png.py, command.py): prompts of exact length with the key at its depth, accuracy by stub models
that always / never / sometimes answer and by real ones, PNG files decoded byte by byte, the
tables, `minift.evaluate` and `python -m minift eval`."""
import json
import math
import re
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import minift
from minift.__main__ import main
from minift.evaluation.forgetting import load_texts
from minift.evaluation.length_perplexity import perplexity_by_length
from minift.evaluation.passkey import FILLER, INTRO, NEEDLE, QUESTION, passkey_grid, passkey_prompt
from minift.evaluation.png import CELL_H, CELL_W, PALETTE, accuracy_color, encode_png, heatmap, line_plot
from minift.models.config import ModelConfig
from minift.models.generation import generate

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "examples" / "base"
GENERAL = ROOT / "examples" / "data" / "general.jsonl"


@pytest.fixture(scope="module")
def tok():
    return minift.load_tokenizer(BASE)


def tiny_model(tok, layers=1):
    torch.manual_seed(0)
    return minift.Llama(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=layers, num_attention_heads=2,
                                    num_key_value_heads=1, max_position_embeddings=512)).eval()


# ---- the prompt --------------------------------------------------------------------------
@pytest.mark.parametrize("length", [120, 161, 300, 777])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_prompt_has_the_exact_length_and_the_key_at_its_depth(tok, length, depth):
    key = "40917"
    p = passkey_prompt(tok, length, depth, key)
    assert len(p.ids) == length
    needle = tok.encode(NEEDLE.format(key=key))
    assert p.ids[p.needle_start:p.needle_end] == needle
    head = [tok.bos_token_id] + tok.encode(INTRO)
    question = tok.encode(QUESTION)
    assert p.ids[:len(head)] == head and p.ids[-len(question):] == question
    n_fill = length - len(head) - len(needle) - len(question)
    # the needle sits on the sentence boundary nearest its depth: off by at most half a sentence
    longest = max(len(tok.encode(" " + s)) for s in FILLER)
    assert abs(p.needle_start - (len(head) + depth * n_fill)) <= longest / 2
    assert tok.decode(p.ids).count(key) == 2 and p.answer_ids == tok.encode(" " + key)


def test_deeper_keys_sit_later(tok):
    starts = [passkey_prompt(tok, 600, d, "12345").needle_start for d in np.linspace(0, 1, 11)]
    assert starts == sorted(starts) and starts[-1] - starts[0] > 400


@pytest.mark.parametrize("kwargs, match", [
    (dict(length=20, depth=0.5, key="12345"), r"passkey: length 20 is shorter than the prompt without"),
    (dict(length=200, depth=1.5, key="12345"), r"passkey: each depth must be a number in \[0, 1\], got 1.5"),
    (dict(length=200, depth=0.5, key="12a45"), r"passkey: key must be a string of digits"),
    (dict(length=0, depth=0.5, key="12345"), r"passkey: length must be a positive integer"),
])
def test_bad_prompt_arguments_name_the_field(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        passkey_prompt(tok, **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lengths=[]), r"passkey: lengths must be a non-empty list"),
    (dict(lengths=[200], depths=[0.5, -0.1]), r"each depth must be a number in \[0, 1\], got -0.1"),
    (dict(lengths=[200], trials=0), r"passkey: trials must be a positive integer"),
    (dict(lengths=[200], digits=19), r"passkey: digits must be at most 18"),
    (dict(lengths=[200], method="guess"), r"passkey: method must be one of generate, score"),
])
def test_bad_grid_arguments_name_the_field(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        passkey_grid(Never(tok), tok, **kwargs)


SHORT = dict(intro="", needle=" The key is {key}.", question=" The key is")


@pytest.mark.parametrize("length, depth", [(40, 0.0), (64, 0.5), (64, 1.0), (255, 0.3)])
def test_own_texts_make_a_shorter_prompt_of_the_exact_length(tok, length, depth):
    p = passkey_prompt(tok, length, depth, "417", **SHORT)
    assert len(p.ids) == length and p.ids[0] == tok.bos_token_id
    assert p.ids[p.needle_start:p.needle_end] == tok.encode(" The key is 417.")
    question = tok.encode(" The key is")
    assert p.ids[-len(question):] == question and p.answer_ids == tok.encode(" 417")
    longest = max(len(tok.encode(" " + s)) for s in FILLER)
    n_fill = length - 1 - len(tok.encode(" The key is 417.")) - len(question)
    assert abs(p.needle_start - (1 + depth * n_fill)) <= longest / 2
    with pytest.raises(ValueError, match=r"passkey: length 10 is shorter than the prompt without filler \(\d+ tokens"):
        passkey_prompt(tok, 10, depth, "417", **SHORT)


def test_the_grid_uses_its_own_texts(tok):
    result = passkey_grid(Copier(tok), tok, [48, 64], [0.0, 1.0], trials=2, seed=1, digits=3, **SHORT)
    assert np.array_equal(result.accuracy, np.ones((2, 2)))  # the stub copies after " The key is"
    default = passkey_grid(Copier(tok), tok, [130], [0.0], trials=2, seed=1, digits=3)
    assert result.trials[0].key == default.trials[0].key  # the seed fixes the keys, whatever the texts
    assert result.trials[0].needle_start < default.trials[0].needle_start  # no intro


@pytest.mark.parametrize("kwargs, match", [
    (dict(needle=" The key is 5."), r"passkey: needle must contain '\{key\}'"),
    (dict(question=""), r"passkey: question must not be empty"),
    (dict(intro=None), r"passkey: intro must be a string, got None"),
])
def test_bad_texts_name_the_field(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        passkey_prompt(tok, 200, 0.5, "12345", **kwargs)
    with pytest.raises(ValueError, match=match):
        passkey_grid(Never(tok), tok, [200], **kwargs)


# ---- stub models -------------------------------------------------------------------------
class Copier(nn.Module):
    """An induction head by hand: at each of the last 16 positions it predicts the token that
    followed the longest earlier match of the text ending there (ties: the latest). After
    "... The pass key is" that is the key's first token, then the next, and so on. With a
    KV cache (minift.generate) it keeps the text seen so far itself."""

    def __init__(self, tok, only_shorter_than=None):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=tok.vocab_size, num_hidden_layers=1,
                                      eos_token_id=tok.eos_token_id)
        self.eos, self.limit, self.seen, self.answering = tok.eos_token_id, only_shorter_than, None, True

    def next_token(self, seq, t):
        best, best_len = None, 0
        for j in range(t - 1, -1, -1):
            k = 0
            while k <= j and seq[j - k] == seq[t - k]:
                k += 1
            if k > best_len:
                best, best_len = seq[j + 1], k
        return best if best is not None else self.eos

    def forward(self, ids, attention_mask=None, position_ids=None, kv_cache=None):
        grow = kv_cache is not None and ids.shape[1] == 1 and self.seen is not None
        self.seen = torch.cat([self.seen, ids], 1) if grow else ids
        if not grow:  # a new prompt: answered unless it is too long
            self.answering = self.limit is None or ids.shape[1] < self.limit
        rows, t_all = self.seen.shape
        logits = torch.zeros(rows, ids.shape[1], self.config.vocab_size)
        for b, seq in enumerate(self.seen.tolist()):
            for i in range(max(0, ids.shape[1] - 16), ids.shape[1]):
                t = t_all - ids.shape[1] + i
                logits[b, i, self.next_token(seq, t) if self.answering else self.eos] = 1.0
        return logits


class Never(Copier):
    """Always the end-of-sequence token: never a digit."""

    def forward(self, ids, attention_mask=None, position_ids=None, kv_cache=None):
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.config.vocab_size)
        logits[..., self.eos] = 1.0
        return logits


@pytest.mark.parametrize("method", ["generate", "score"])
def test_a_model_that_always_answers_scores_one_and_one_that_never_does_zero(tok, method):
    kw = dict(lengths=[130, 170], depths=[0.0, 0.5, 1.0], trials=2, seed=3, method=method)
    right = passkey_grid(Copier(tok), tok, **kw)
    assert np.array_equal(right.accuracy, np.ones((2, 3)))
    assert all(re.search(r"\d+", t.reply).group() == t.key for t in right.trials)
    wrong = passkey_grid(Never(tok), tok, **kw)
    assert np.array_equal(wrong.accuracy, np.zeros((2, 3)))
    assert [t.key for t in right.trials] == [t.key for t in wrong.trials]  # the seed fixes the keys
    assert len({t.key for t in right.trials}) == len(right.trials)


@pytest.mark.parametrize("method", ["generate", "score"])
def test_accuracy_is_counted_per_cell(tok, method):
    # answers only prompts shorter than 150 tokens (+ the answer when scoring): rows differ
    result = passkey_grid(Copier(tok, only_shorter_than=155), tok, [130, 170], [0.0, 1.0], trials=3,
                          method=method)
    assert np.array_equal(result.accuracy, np.array([[1.0, 1.0], [0.0, 0.0]]))
    table = result.table()
    assert "3 trials per cell" in table and re.search(r"^\s+130\s+1\.00\s+1\.00\s+1\.00$", table, re.M)
    assert re.search(r"^\s+170\s+0\.00\s+0\.00\s+0\.00$", table, re.M)


def test_a_real_model_is_judged_by_its_own_greedy_reply(tok):
    model = tiny_model(tok)
    result = passkey_grid(model, tok, [140], [0.0, 1.0], trials=2, seed=1)
    for t in result.trials:
        p = passkey_prompt(tok, t.length, t.depth, t.key)
        ids = torch.tensor([p.ids])
        new = generate(model, ids, max_new_tokens=len(p.answer_ids) + 2, eos_token_id=tok.eos_token_id)
        assert t.reply == tok.decode(new[0, ids.shape[1]:].tolist())
        found = re.search(r"\d+", t.reply)
        assert t.correct == (found is not None and found.group() == t.key)
    assert result.accuracy.mean() == pytest.approx(np.mean([t.correct for t in result.trials]))
    # score: correct exactly when every answer token is the argmax after the ones before it
    scored = passkey_grid(model, tok, [140], [0.5], trials=2, seed=1, method="score")
    for t in scored.trials:
        p = passkey_prompt(tok, 140, 0.5, t.key)
        with torch.no_grad():
            logits = model(torch.tensor([p.ids + p.answer_ids[:-1]]))[0, -len(p.answer_ids):]
        assert t.correct == (logits.argmax(-1).tolist() == p.answer_ids)


# ---- PNG ---------------------------------------------------------------------------------
def crc32(data: bytes) -> int:
    """CRC-32 (ISO 3309, the PNG spec's annex D) bit by bit, independent of zlib."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB, non-interlaced PNG back to (H, W, 3), checking every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == crc32(kind + body), kind
        chunks.append((kind, body))
        pos += 12 + n
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, color, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, inter) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].reshape(h, w, 3)


def test_png_round_trips_through_our_decoder_and_pillow(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 13, 3), dtype=np.uint8)
    data = encode_png(image)
    assert np.array_equal(decode_png(data), image)
    pil = pytest.importorskip("PIL.Image")
    (tmp_path / "x.png").write_bytes(data)
    assert np.array_equal(np.asarray(pil.open(tmp_path / "x.png").convert("RGB")), image)
    with pytest.raises(ValueError, match=r"encode_png: image must be a non-empty \(H, W, 3\) uint8"):
        encode_png(image.astype(np.float32))


def test_heatmap_cells_have_the_colour_of_their_accuracy(tok, tmp_path):
    result = passkey_grid(Copier(tok, only_shorter_than=155), tok, [130, 170], [0.0, 1.0], trials=1,
                          method="score")
    path = result.save_png(tmp_path / "passkey.png")
    image = decode_png(path.read_bytes())
    acc = result.accuracy
    # find the grid: the first pixel of the first cell's colour, then step cell by cell
    ys, xs = np.nonzero(np.all(image == accuracy_color(acc[0, 0]), axis=-1))
    y0, x0 = ys.min(), xs.min()
    for i in range(2):
        for j in range(2):
            pixel = image[y0 + i * CELL_H + 2, x0 + j * CELL_W + 2]
            assert tuple(pixel) == accuracy_color(acc[i, j]), (i, j)
    assert accuracy_color(0.0) != accuracy_color(1.0)


def test_line_plot_draws_each_series_in_its_colour(tmp_path):
    image = line_plot({"a": ([0, 1, 2], [1.0, 5.0, 2.0]), "b": ([0, 2], [3.0, math.nan])},
                      "T", "X", "Y").rgb
    for color in PALETTE[:2]:
        assert np.all(image == color, axis=-1).sum() > 20
    with pytest.raises(ValueError, match="line_plot: no finite points"):
        line_plot({"a": ([0], [math.nan])}, "T", "X", "Y")
    assert heatmap(np.full((1, 1), np.nan), ["1"], ["2"], "T", "X", "Y").rgb.shape[2] == 3


# ---- perplexity by length ----------------------------------------------------------------
def test_perplexity_by_length_equals_a_direct_loop(tok, tmp_path):
    model = tiny_model(tok)
    texts = load_texts(GENERAL)
    curve = perplexity_by_length(model, tok, texts, [16, 64], buckets=4, max_windows=3, batch_size=2, chunk=5)
    stream = [t for text in texts for t in [tok.bos_token_id] + tok.encode(text)]
    for n, loss, ppl, buckets in zip([16, 64], curve.loss, curve.perplexity, curve.bucket_perplexity):
        windows = torch.tensor(stream[:3 * n]).view(3, n)
        with torch.no_grad():
            logits = model(windows)[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")
        assert loss == pytest.approx(float(nll.mean()), rel=1e-5) and ppl == pytest.approx(math.exp(loss))
        quarter = [float(nll[:, [p - 1 for p in range(1, n) if p * 4 // n == b]].mean()) for b in range(4)]
        assert buckets == pytest.approx([math.exp(q) for q in quarter], rel=1e-5)
    assert curve.tokens == [3 * 15, 3 * 63] and curve.windows == [3, 3]
    table = curve.table()
    assert re.search(rf"^\s+64\s+3\s+189\s+{curve.perplexity[1]:.3f}", table, re.M)
    decode_png(curve.save_png(tmp_path / "ppl.png").read_bytes())
    json.dumps(curve.as_dict())


def test_perplexity_by_length_errors_name_the_field(tok):
    model = tiny_model(tok)
    with pytest.raises(ValueError, match=r"lengths: 100000 tokens is longer than the texts"):
        perplexity_by_length(model, tok, ["short text"] * 3, [8, 100000])
    with pytest.raises(ValueError, match=r"buckets=8 is more than the 3 scored positions"):
        perplexity_by_length(model, tok, ["short text"] * 3, [4], buckets=8)
    with pytest.raises(ValueError, match=r"lengths must be an integer >= 2"):
        perplexity_by_length(model, tok, ["short text"] * 3, [1])


# ---- the entry points --------------------------------------------------------------------
def test_evaluate_runs_the_long_context_tasks(tok):
    model = tiny_model(tok)
    out = minift.evaluate(model, tok, general_texts=load_texts(GENERAL),
                          passkey={"lengths": [130], "depths": [0.5], "trials": 1},
                          by_length={"lengths": [32], "max_windows": 2})
    assert out["passkey"].accuracy.shape == (1, 1)
    assert out["perplexity_by_length"].windows == [2] and "general" in out
    with pytest.raises(ValueError, match=r"evaluate: passkey must be a dict of passkey_grid arguments"):
        minift.evaluate(model, tok, passkey=[130])
    with pytest.raises(ValueError, match=r"evaluate: by_length scores general_texts"):
        minift.evaluate(model, tok, by_length={"lengths": [32]})


def test_eval_command_prints_tables_and_writes_files(tmp_path, capsys):
    code = main(["eval", str(BASE), "--passkey", "130", "--depths", "0,1", "--trials", "1",
                 "--method", "score", "--ppl", "32,64", "--texts", str(GENERAL), "--max-windows", "2",
                 "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert code == 0 and "passkey retrieval accuracy (1 trials per cell, score)" in printed
    assert "perplexity by context length" in printed
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved["lengths"] == [130] and saved["depths"] == [0.0, 1.0] and len(saved["trials"]) == 2
    assert json.loads((tmp_path / "perplexity_by_length.json").read_text())["lengths"] == [32, 64]
    for name in ("passkey.png", "perplexity_by_length.png"):
        assert decode_png((tmp_path / name).read_bytes()).shape[2] == 3
    with pytest.raises(SystemExit) as err:
        main(["eval", str(BASE), "--passkey", "1x"])
    assert err.value.code == 2
    assert "--passkey: expected comma-separated token counts" in capsys.readouterr().err
