"""minift/evaluation/forgetting.py: task metrics by hand-checked cases, perplexity against a direct loop, the
forgetting budget, and the shipped general-text set."""
import json
import math
from pathlib import Path

import pytest
import torch

import minift
from minift.evaluation.forgetting import evaluate, forgetting, load_texts, perplexity
from minift.evaluation.metrics import exact_match, is_json, lcs_length, rouge_l, task_metrics, token_f1
from minift.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "examples" / "base"


def test_exact_match_ignores_case_and_spacing_only():
    assert exact_match("  Three Hundred\tten ", "three hundred ten") == 1.0
    assert exact_match("three hundred ten.", "three hundred ten") == 0.0


def test_token_f1_by_hand():
    # pred 4 tokens, ref 3, common {three, hundred} = 2: P 1/2, R 2/3, F1 = 4/7
    assert token_f1("three hundred and ten", "three hundred five") == pytest.approx(4 / 7)
    assert token_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multiset: min counts a 1, b 1
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_rouge_l_by_hand():
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    assert lcs_length([], ["a"]) == 0
    # LCS "one two four" = 3; P 3/4, R 3/5 -> F1 = 2/3
    assert rouge_l("one two three four", "one five two four six") == pytest.approx(2 / 3)
    assert rouge_l("b a", "a b") == pytest.approx(0.5)  # order matters, unlike token F1
    assert token_f1("b a", "a b") == 1.0


def test_task_metrics_reports_json_validity_only_for_json_references():
    plain = task_metrics(["one", "two"], ["one", "three"])
    assert plain == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5, "samples": 2}
    js = task_metrics(['{"a": 1}', '{"a": ', "[1, 2]"], ['{"a": 1}', '{"a": 2}', "[1]"])
    assert js["json_valid"] == pytest.approx(2 / 3) and js["exact_match"] == pytest.approx(1 / 3)
    assert is_json("12") and not is_json("{'a': 1}")
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        task_metrics(["a", "b"], ["a"])


def direct_perplexity(model, ids_list):
    total, n = 0.0, 0
    for ids in ids_list:
        logits = model(torch.tensor([ids]))[0].double()
        for t in range(1, len(ids)):
            total -= float(torch.log_softmax(logits[t - 1], -1)[ids[t]])
            n += 1
    return total / n, n


@pytest.fixture(scope="module")
def tok():
    return minift.load_tokenizer(BASE)


def test_perplexity_equals_a_direct_loop_with_windows(tok):
    model = minift.Llama(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).eval()
    texts = ["Every number has a name.", "In words, 45 is forty-five. Digits are short."]
    ids = [[tok.bos_token_id] + tok.encode(t) for t in texts]
    with torch.no_grad():
        loss, n = direct_perplexity(model, ids)
        got = perplexity(model, tok, texts, "cpu", batch_size=1)
        assert got["tokens"] == n and got["loss"] == pytest.approx(loss, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        # windows of 8 overlapping by one token: every token scored once, each window from scratch
        windowed = perplexity(model, tok, texts, "cpu", max_length=8, batch_size=3)
        pieces = [row[i:i + 8] for row in ids for i in range(0, len(row) - 1, 7)]
        loss8, n8 = direct_perplexity(model, [p for p in pieces if len(p) > 1])
    assert windowed["tokens"] == n == n8 and windowed["loss"] == pytest.approx(loss8, rel=1e-5)



def test_perplexity_scores_a_chunk_at_a_time_in_the_training_dtype(tok):
    # the general-text check runs the training loss's path: lm_head on (chunk, H) slices, never
    # (B, T, V) logits, and under bf16 autocast when training uses it
    model = minift.Llama(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1)).eval()
    texts = ["Every number has a name.", "In words, 45 is forty-five. Digits are short."]
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape), o.dtype)))
    with torch.no_grad():
        full = perplexity(model, tok, texts, "cpu", loss_chunk_size=None)
        assert len(seen[0][0]) == 3  # (B, T, H): the whole batch's logits at once
        seen.clear()
        chunked = perplexity(model, tok, texts, "cpu", loss_chunk_size=4)
        assert seen and all(len(shape) == 2 and shape[0] <= 4 for shape, _ in seen)
        assert chunked["tokens"] == full["tokens"]
        assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-5)
        seen.clear()
        out = evaluate(model, tok, general_texts=texts, bf16=True, loss_chunk_size=4)
    assert seen and all(dtype == torch.bfloat16 for _, dtype in seen)
    assert out["general"]["loss"] == pytest.approx(full["loss"], rel=0.05)


def test_forgetting_budget():
    report = forgetting({"perplexity": 10.0}, {"perplexity": 10.4})
    assert report["relative_change"] == pytest.approx(0.04) and report["within_budget"]
    worse = forgetting({"perplexity": 10.0}, {"perplexity": 10.6}, budget=0.05)
    assert worse["relative_change"] == pytest.approx(0.06) and not worse["within_budget"]
    with pytest.raises(ValueError, match="budget"):
        forgetting({"perplexity": 1.0}, {"perplexity": 1.0}, budget=-1)


def test_shipped_general_texts_and_bad_rows(tmp_path):
    texts = load_texts(ROOT / "examples" / "data" / "general.jsonl")
    assert len(texts) >= 10 and all(len(t) > 40 for t in texts)
    bad = tmp_path / "g.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: field 'text' must be a non-empty string"):
        load_texts(bad)


def test_evaluate_scores_replies_of_the_shipped_base(tok):
    model = minift.load_model(BASE, dtype=torch.float32)
    rows = [json.loads(line) for line in (ROOT / "examples/data/eval.jsonl").read_text().splitlines()[:2]]
    prompts = [r["messages"][:-1] for r in rows]
    refs = [r["messages"][-1]["content"] for r in rows]
    result = evaluate(model, tok, prompts, refs, general_texts=["Every number has a name."])
    got = [s["got"] for s in result["samples"]]
    # the metrics are those of the replies the model actually gave
    assert result["task"] == task_metrics(got, refs)
    assert result["general"]["tokens"] == len(tok.encode("Every number has a name."))
    with pytest.raises(ValueError, match="one reference reply per conversation"):
        evaluate(model, tok, prompts, refs[:1])
