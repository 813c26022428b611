"""Multiple-choice scoring against transformers: the same log-likelihoods from a plain loop over
(context, choice) pairs run by LlamaForCausalLM on the converted model, the shipped set's checks,
few-shot contexts, acc_norm and the one-line errors."""
import collections
import json
import random
from pathlib import Path

import pytest
import torch

import minift
from minift.__main__ import main
from minift.evaluation.forgetting import accuracy_drop
from minift.evaluation.multiple_choice import encode_pair, load_choice_rows, loglikelihoods, multiple_choice
from minift.models.config import ModelConfig

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "examples" / "base"
SHIPPED = ROOT / "examples" / "data" / "general_mc.jsonl"


@pytest.fixture(scope="module")
def tok():
    return minift.load_tokenizer(BASE)


@pytest.fixture(scope="module")
def hf_tok():
    return transformers.AutoTokenizer.from_pretrained(BASE)


@pytest.fixture(scope="module")
def rows():
    return load_choice_rows(SHIPPED)


def to_transformers(model, path):
    minift.save_model(model, path)
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    model = minift.load_model(BASE, dtype=torch.float32)
    return model, to_transformers(model, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def tiny(tok, tmp_path_factory):
    torch.manual_seed(0)
    model = minift.Llama(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1)).eval()
    return model, to_transformers(model, tmp_path_factory.mktemp("tiny"))


def oracle_lls(hf, hf_tok, context, continuations):
    """log p(continuation | context) of each continuation: BOS + context tokens, then what encoding
    both adds; one right-padded transformers forward for all of them, summed in float64."""
    enc = lambda s: [hf_tok.bos_token_id] + hf_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx = enc(context)
    conts = [enc(context + c)[len(ctx):] for c in continuations]
    width = len(ctx) + max(map(len, conts))
    ids = torch.tensor([ctx + c + [0] * (width - len(ctx) - len(c)) for c in conts])
    mask = torch.tensor([[1] * (len(ctx) + len(c)) + [0] * (width - len(ctx) - len(c)) for c in conts])
    with torch.no_grad():
        logp = hf(ids, attention_mask=mask).logits.double().log_softmax(-1)
    return [sum(float(logp[i, len(ctx) - 1 + k, t]) for k, t in enumerate(c)) for i, c in enumerate(conts)]


def oracle(hf, hf_tok, rows, shots=0, pool=None, seed=0):
    """Per row, the log-likelihood of each choice, from the context the docs define."""
    rng, out = random.Random(seed), []
    for i, row in enumerate(rows):
        candidates = list(enumerate(pool)) if pool is not None else [(j, r) for j, r in enumerate(rows) if j != i]
        picked = [candidates[k][1] for k in rng.sample(range(len(candidates)), shots)]
        parts = [f"Question: {r['question']}\nAnswer: {r['choices'][r['answer']]}" for r in picked]
        context = "\n\n".join(parts + [f"Question: {row['question']}\nAnswer:"])
        out.append(oracle_lls(hf, hf_tok, context, [" " + c for c in row["choices"]]))
    return out


def argmax(values):
    return max(range(len(values)), key=values.__getitem__)


def check_against(got, want, rows):
    for g, w in zip(got["loglikelihoods"], want):
        assert g == pytest.approx(w, abs=1e-4)
    assert got["predictions"] == [argmax(w) for w in want]
    norm = [argmax([v / len(c) for v, c in zip(w, r["choices"])]) for w, r in zip(want, rows)]
    assert got["predictions_norm"] == norm
    assert got["acc"] == sum(p == r["answer"] for p, r in zip(got["predictions"], rows)) / len(rows)
    assert got["acc_norm"] == sum(p == r["answer"] for p, r in zip(norm, rows)) / len(rows)


def test_shipped_set_is_balanced_and_well_formed(rows, tmp_path):
    assert len(rows) == 100
    assert all(len(r["choices"]) == 4 == len(set(r["choices"])) for r in rows)
    assert collections.Counter(r["answer"] for r in rows) == {0: 25, 1: 25, 2: 25, 3: 25}
    assert len({r["question"] for r in rows}) == 100
    bad = tmp_path / "mc.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "answer": 4}) + "\n")
    with pytest.raises(ValueError, match=rf"^{bad}:2: field 'answer' must be an index into the 4 choices, got 4$"):
        load_choice_rows(bad)


@pytest.mark.slow  # 100 questions x 4 choices through both models: ~10-40 s on 2 busy cores
def test_shipped_base_matches_transformers_on_every_item(base, tok, hf_tok, rows):
    model, hf = base
    got = multiple_choice(model, tok, rows, batch_size=200)
    want = oracle(hf, hf_tok, rows)
    check_against(got, want, rows)
    # acc_norm is its own ranking: on the shipped set it picks otherwise for some rows
    assert got["predictions"] != got["predictions_norm"]


def test_tiny_model_zero_and_two_shot_match_transformers(tiny, tok, hf_tok, rows):
    model, hf = tiny
    picked = rows[::20]
    check_against(multiple_choice(model, tok, picked), oracle(hf, hf_tok, picked), picked)
    # two shots drawn from the other rows, or from a separate pool; padding in a batch of 3 pairs
    two = multiple_choice(model, tok, picked, num_fewshot=2, batch_size=3, seed=3)
    check_against(two, oracle(hf, hf_tok, picked, shots=2, seed=3), picked)
    pool = rows[1::20]
    from_pool = multiple_choice(model, tok, picked, num_fewshot=2, fewshot_rows=pool, seed=1)
    check_against(from_pool, oracle(hf, hf_tok, picked, shots=2, pool=pool, seed=1), picked)


def test_continuation_split_across_a_merge_and_chunked_log_probs(tiny, tok, hf_tok):
    model, hf = tiny
    # "hun" + "dred" encodes as one token across the boundary: the context keeps its own tokens
    # and the continuation is what the whole encoding holds past them, as the harness splits
    ctx, cont = encode_pair(tok, "Count: hun", "dred")
    whole = [tok.bos_token_id] + tok.encode("Count: hundred")
    assert ctx == [tok.bos_token_id] + tok.encode("Count: hun") and cont == whole[len(ctx):]
    assert whole[:len(ctx)] != ctx
    # trailing spaces of the context move to the continuation
    assert encode_pair(tok, "Answer: ", "12") == encode_pair(tok, "Answer:", " 12")
    pairs = [(ctx, cont), encode_pair(tok, "Answer:", " 12")]
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].dim()))
    chunked = loglikelihoods(model, pairs, loss_chunk_size=4)
    hook.remove()
    assert seen and set(seen) == {2}  # (chunk, H) slices only, never (B, T, H)
    assert chunked == pytest.approx(oracle_lls(hf, hf_tok, "Count: hun", ["dred"])
                                    + oracle_lls(hf, hf_tok, "Answer:", [" 12"]), abs=1e-4)
    assert loglikelihoods(model, pairs, loss_chunk_size=None) == pytest.approx(chunked, abs=1e-5)


@pytest.mark.parametrize("bad, words", [
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "row 1: field 'question' must be a non-empty string"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "row 1: field 'choices' must be a list of >= 2"),
    ({"question": "q", "choices": ["a", 3], "answer": 0}, "row 1: field 'choices'"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "row 1: field 'answer' must be an index into the 2"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "row 1: field 'answer'"),
    ({"question": "q", "choices": ["a", "b"]}, "row 1: field 'answer'"),
    ("not a row", "row 1: expected a dict"),
])
def test_bad_rows_are_one_line_errors(tiny, tok, rows, bad, words):
    with pytest.raises(ValueError, match=words) as err:
        multiple_choice(tiny[0], tok, [rows[0], bad])
    assert "\n" not in str(err.value)


def test_bad_arguments(tiny, tok, rows):
    with pytest.raises(ValueError, match="fewshot row 0: field 'question'"):
        multiple_choice(tiny[0], tok, rows[:2], num_fewshot=1, fewshot_rows=[{"choices": ["a", "b"]}])
    with pytest.raises(ValueError, match="num_fewshot=2 but only 1 few-shot rows"):
        multiple_choice(tiny[0], tok, rows[:2], num_fewshot=2)
    with pytest.raises(ValueError, match="no rows to score"):
        multiple_choice(tiny[0], tok, [])


def test_accuracy_drop_budget_is_absolute_points():
    before, after = {"acc": 0.40, "acc_norm": 0.30}, {"acc": 0.36, "acc_norm": 0.35}
    report = accuracy_drop(before, after)
    assert report["acc"]["drop"] == pytest.approx(0.04) and report["acc_norm"]["drop"] == pytest.approx(-0.05)
    assert report["within_budget"] and report["budget"] == 0.05
    assert accuracy_drop(before, {"acc": 0.34, "acc_norm": 0.3})["within_budget"] is False
    assert accuracy_drop(before, {"acc": 0.35, "acc_norm": 0.3})["within_budget"]  # exactly 5 points
    with pytest.raises(ValueError, match="budget"):
        accuracy_drop(before, after, budget=-0.1)


def test_evaluate_and_the_eval_command_report_before_and_after(base, tok, rows, tmp_path, capsys):
    model = base[0]
    few = rows[:8]
    found = minift.evaluate(model, tok, general_texts=["Every number has a name."], mc_rows=few, mc_fewshot=1)
    assert found["multiple_choice"] == multiple_choice(model, tok, few, num_fewshot=1)
    assert "general" in found
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in few))
    torch.manual_seed(0)
    wrapped = minift.lora_wrap(minift.load_model(BASE, dtype=torch.float32), r=4, alpha=8)
    for name, p in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # an adapter that changes the model
    minift.save_adapter(wrapped, tmp_path / "adapter")
    assert main(["eval", str(BASE), "--adapter", str(tmp_path / "adapter"), "--mc", str(path),
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "multiple_choice.json").read_text())
    after = multiple_choice(wrapped, tok, few)
    assert saved["before"]["acc"] == multiple_choice(model, tok, few)["acc"] and saved["after"]["acc"] == after["acc"]
    verdict = "PASS" if saved["drop"]["within_budget"] else "FAIL"
    assert f"acc drop {saved['drop']['acc']['drop'] * 100:+.1f} points (budget 5): {verdict}" in printed
    with pytest.raises(SystemExit) as err:
        main(["eval", str(BASE), "--mc", str(tmp_path / "missing.jsonl")])
    assert err.value.code == 2 and "missing.jsonl" in capsys.readouterr().err

