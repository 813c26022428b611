"""minift.data.sft: JSONL rows -> masked token ids -> bucketed or packed batches."""
import json
import random
import warnings
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from minift.data.sft import batch_examples, load_dataset, load_jsonl, padding_efficiency, tokenize_rows
from minift.models.chat_templates import BUILTIN_TEMPLATES
from minift.models.tokenizer import load_tokenizer
from minift.names import IGNORE_INDEX

SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["Paris is the capital of France.", "Hello! How can I help you today?",
          "Write a short poem about the sea.", "The answer is 42 and 3.14."] * 3

CHAT = {"messages": [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."}]}
ALPACA = {"instruction": "Name the capital.", "input": "France", "output": "Paris."}
PROMPT = {"prompt": "Write about the sea.", "completion": "Waves fold over."}

# what each template trains for one reply: the reply text and the marker that ends its turn
REPLY = {"llama-3": "{}<|eot_id|>", "chatml": "{}<|im_end|>", "llama-2": " {} </s>", "alpaca": "{}</s>"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "clean_up_tokenization_spaces": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir, chat_template="chatml")


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def trained_runs(tokenizer, example):
    """Decoded text of each maximal run of trained positions."""
    runs, cur = [], []
    for tok_id, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == tok_id
            cur.append(tok_id)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_only_replies_and_their_end_marker_are_trained(tok_dir, name):
    tokenizer = load_tokenizer(tok_dir, chat_template=name)
    (ex,), stats = tokenize_rows([CHAT], tokenizer, max_length=512)
    ref = AutoTokenizer.from_pretrained(str(tok_dir))
    ref.chat_template = BUILTIN_TEMPLATES[name]
    assert ex["input_ids"] == ref.apply_chat_template(CHAT["messages"], tokenize=True, return_dict=False)
    assert trained_runs(tokenizer, ex) == [REPLY[name].format("Hello! How can I help?"),
                                           REPLY[name].format("Paris.")]
    assert stats.trained_tokens == sum(lab != IGNORE_INDEX for lab in ex["labels"][1:])
    assert stats.total_tokens == len(ex["input_ids"]) and (stats.rows, stats.examples) == (1, 1)


def test_alpaca_and_prompt_completion_rows(tok):
    examples, stats = tokenize_rows([ALPACA, PROMPT, {**ALPACA, "input": ""}], tok, max_length=512)
    assert [trained_runs(tok, ex) for ex in examples] == [
        ["Paris.<|im_end|>"], ["Waves fold over.<|im_end|>"], ["Paris.<|im_end|>"]]
    assert "Name the capital.\n\nFrance" in tok.decode(examples[0]["input_ids"])
    assert stats["rows"] == 3 and stats.as_dict()["truncated"] == 0


def test_truncation_counts_and_drops_rows_without_trainable_tokens(tok):
    long_prompt = {"prompt": "Write a short poem about the sea. " * 20, "completion": "Waves."}
    rows = [CHAT, long_prompt, PROMPT, long_prompt]
    with pytest.warns(UserWarning, match=r"train.jsonl: dropped 2 row\(s\).*first at line 2"):
        examples, stats = tokenize_rows(rows, tok, max_length=44, source="train.jsonl")
    assert (stats.rows, stats.examples, stats.dropped) == (4, 2, 2)
    # CHAT (85 tokens, first reply from token 35) and both long prompts exceed 44; PROMPT fits
    assert stats.truncated == 3 and [len(ex["input_ids"]) for ex in examples] == [44, 43]
    whole, _ = tokenize_rows(rows, tok, max_length=512)  # the longest row is counted before the cut
    longest = max(range(4), key=lambda i: len(whole[i]["input_ids"]))
    assert (stats.longest, stats.longest_line) == (len(whole[longest]["input_ids"]), longest + 1)
    with pytest.raises(ValueError, match=r"train.jsonl: no example .*2 of 2 rows dropped: 1 whose "
                                         r"replies start after max_length=40 tokens and 1 without "
                                         r"an assistant reply"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenize_rows([long_prompt, {"messages": [{"role": "user", "content": "hi"}]}], tok,
                          max_length=40, source="train.jsonl")


def test_load_dataset_names_file_and_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(PROMPT), "", json.dumps({"foo": 1, "bar": 2})])
    with pytest.raises(ValueError, match=r"d.jsonl:3: unknown row shape with keys \['bar', 'foo'\]"):
        load_dataset(path, tok, 64)
    path = write_jsonl(tmp_path / "e.jsonl", [json.dumps({"prompt": "a", "completion": 5})])
    with pytest.raises(ValueError, match=r"e.jsonl:1: field 'completion' must be a string"):
        load_dataset(path, tok, 64)
    path = write_jsonl(tmp_path / "f.jsonl", [json.dumps({"messages": [{"role": "user"}]})])
    with pytest.raises(ValueError, match=r"f.jsonl:1: messages\[0\] must have string"):
        load_dataset(path, tok, 64)
    path = write_jsonl(tmp_path / "g.jsonl", [json.dumps(ALPACA), json.dumps(CHAT)])
    examples, stats = load_dataset(path, tok, 64)
    assert stats.examples == 2 and examples[0]["input_ids"][0] == tok.token_to_id("<|im_start|>")


def test_load_jsonl_errors(tmp_path):
    good = json.dumps(PROMPT)
    with pytest.raises(ValueError, match=r"bad.jsonl:3: invalid JSON"):
        load_jsonl(write_jsonl(tmp_path / "bad.jsonl", [good, good, '{"prompt": "a",']))
    with pytest.raises(ValueError, match=r"list.jsonl:2: expected a JSON object, got list"):
        load_jsonl(write_jsonl(tmp_path / "list.jsonl", [good, "[1, 2]"]))
    with pytest.raises(ValueError, match=r"empty.jsonl: empty dataset"):
        load_jsonl(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    assert load_jsonl(write_jsonl(tmp_path / "ok.jsonl", [good, "", good])) == [PROMPT, PROMPT]


def test_non_utf8_line_is_named_and_a_bom_is_tolerated(tmp_path, tok):
    good = json.dumps(PROMPT).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n" + '{"prompt": "caf\u00e9", "completion": "x"}'.encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte b'\\xe9' at column 16\)"):
        load_jsonl(path)
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_dataset(path, tok, 64)
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + good + b"\r\n")  # Windows editors write these
    assert load_jsonl(path) == [PROMPT, PROMPT]


def test_template_error_names_the_line(tok_dir):
    tokenizer = load_tokenizer(tok_dir, chat_template="llama-2")
    twice = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                          {"role": "assistant", "content": "c"}]}
    with pytest.raises(ValueError, match=r"x.jsonl:2: chat template error: .*roles must alternate"):
        tokenize_rows([PROMPT, twice], tokenizer, 128, source="x.jsonl")


def test_template_that_rewrites_history_is_an_error(tok_dir):
    # keeps only the last message, so a later render is not an extension of an earlier one
    tokenizer = load_tokenizer(tok_dir, chat_template="{{ messages[-1]['content'] }}"
                               "{% if add_generation_prompt %}>{% endif %}")
    with pytest.raises(ValueError, match=r"x.jsonl:1: the chat template does not render"):
        tokenize_rows([CHAT], tokenizer, 128, source="x.jsonl")


def make_examples(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(5, 250) for _ in range(n)]  # inside the tiny preset's vocabulary
        cut = rng.randrange(0, n)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return out


def rows_of(batches, key="input_ids"):
    """The real (unpadded) content of every row, split per packed sample."""
    out = []
    for b in batches:
        for r in range(b["input_ids"].shape[0]):
            seg = b.get("segment_ids", b["attention_mask"])[r]
            for s in seg.unique().tolist():
                if s:
                    out.append(tuple(b[key][r][seg == s].tolist()))
    return out


@pytest.mark.parametrize("mode", ["bucket", "pack"])
def test_batching_is_deterministic_and_keeps_every_example(mode):
    rng = random.Random(1)
    examples = make_examples([rng.randrange(3, 60) for _ in range(97)])
    state_py, state_torch = random.getstate(), torch.get_rng_state()
    runs = [batch_examples(examples, 4, pad_id=0, mode=mode, max_length=64, seed=s) for s in (7, 7, 8)]
    assert random.getstate() == state_py and torch.equal(torch.get_rng_state(), state_torch)
    first, same, other = runs
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, same) for k in a)
    assert [b["input_ids"].tolist() for b in first] != [b["input_ids"].tolist() for b in other]
    assert Counter(rows_of(first)) == Counter(tuple(e["input_ids"]) for e in examples)
    by_ids = {tuple(e["input_ids"]): e["labels"] for e in examples}
    for ids, labels in zip(rows_of(first), rows_of(first, "labels")):
        expected = by_ids[ids]
        assert list(labels[1:]) == expected[1:]  # aligned with the inputs
        assert labels[0] == (IGNORE_INDEX if mode == "pack" else expected[0])
    for b in first:
        assert set(b) == ({"input_ids", "labels", "attention_mask"} |
                          ({"position_ids", "segment_ids"} if mode == "pack" else set()))
        assert all(v.dtype == torch.long and v.shape == b["input_ids"].shape for v in b.values())
        assert b["input_ids"].shape[0] <= 4 and b["input_ids"].shape[1] <= 64
        pad = b["attention_mask"] == 0
        assert (b["input_ids"][pad] == 0).all() and (b["labels"][pad] == IGNORE_INDEX).all()


def test_bucketing_beats_unsorted_batches():
    rng = random.Random(3)
    lengths = [rng.randrange(4, 200) for _ in range(400)]
    examples = make_examples(lengths)
    bucket = padding_efficiency(batch_examples(examples, 8, pad_id=0, seed=0))
    shuffled = random.Random(0).sample(lengths, len(lengths))
    chunks = [shuffled[i:i + 8] for i in range(0, len(shuffled), 8)]
    baseline = sum(lengths) / sum(len(c) * max(c) for c in chunks)
    packed = padding_efficiency(batch_examples(examples, 8, pad_id=0, mode="pack", max_length=256))
    assert baseline < 0.7 < bucket and packed > 0.9


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 48), min_size=1, max_size=40), st.integers(1, 5), st.integers(0, 9))
def test_pack_rows_fit_and_ids_restart_per_sample(lengths, batch_size, seed):
    batches = batch_examples(make_examples(lengths, seed), batch_size, pad_id=1, mode="pack",
                             max_length=48, seed=seed)
    assert sorted(len(r) for r in rows_of(batches)) == sorted(lengths)
    for b in batches:
        seg, pos, mask = b["segment_ids"], b["position_ids"], b["attention_mask"]
        assert seg.shape[1] <= 48 and torch.equal(mask, (seg > 0).long())
        for r in range(seg.shape[0]):
            k = int(seg[r].max())
            real = seg[r][mask[r] == 1]
            # samples sit left to right as 1, 2, ..., k with padding only at the end
            assert real.tolist() == sorted(real.tolist()) and set(real.tolist()) == set(range(1, k + 1))
            for s in range(1, k + 1):
                assert pos[r][seg[r] == s].tolist() == list(range(int((seg[r] == s).sum())))


def test_packed_batch_gives_the_logits_of_separate_samples():
    from minift.models.config import ModelConfig
    from minift.models.llama import Llama
    model = Llama(ModelConfig.from_name("tiny")).eval()
    examples = make_examples([5, 9, 3, 7])
    (packed,) = batch_examples(examples, 4, pad_id=0, mode="pack", max_length=32, shuffle=False)
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"})
        for ex in examples:
            alone = model(torch.tensor([ex["input_ids"]]))[0]
            row = packed["input_ids"][0]
            start = next(i for i in range(len(row)) if row[i:i + len(alone)].tolist() == ex["input_ids"])
            torch.testing.assert_close(logits[0, start:start + len(alone)], alone, atol=1e-5, rtol=1e-4)


def test_batching_errors():
    examples = make_examples([4, 70])
    with pytest.raises(ValueError, match="mode must be 'bucket' or 'pack', got 'sorted'"):
        batch_examples(examples, 2, pad_id=0, mode="sorted")
    with pytest.raises(ValueError, match="mode='pack' needs max_length"):
        batch_examples(examples, 2, pad_id=0, mode="pack")
    with pytest.raises(ValueError, match=r"example 1 has 70 tokens > max_length=64"):
        batch_examples(examples, 2, pad_id=0, mode="pack", max_length=64)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        batch_examples(examples, 0, pad_id=0)
    with pytest.raises(ValueError, match=r"example 0: needs non-empty 'input_ids' and 'labels'"):
        batch_examples([{"input_ids": [1, 2], "labels": [1]}], 1, pad_id=0)
