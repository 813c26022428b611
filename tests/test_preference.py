"""minift/data/preference.py: preference rows to pairs, labels on the reply only, pair batches, errors."""
import json
from pathlib import Path

import pytest
import torch

import minift
from minift.checkpoints.steps import data_fingerprint
from minift.data.preference import collate_pairs, load_preferences, pair_batches, tokenize_preferences

BASE = Path(__file__).resolve().parents[1] / "examples" / "base"


@pytest.fixture(scope="module")
def tok():
    return minift.load_tokenizer(BASE)


def write_rows(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_row_labels_cover_only_the_reply(tok):
    (pair,), stats = tokenize_preferences(
        [{"prompt": "What is 12 in words?", "chosen": "twelve", "rejected": "twenty"}], tok, 64)
    for half, reply in (("chosen", "twelve"), ("rejected", "twenty")):
        ids, labels = pair[f"{half}_ids"], pair[f"{half}_labels"]
        full = tok.apply_chat_template([{"role": "user", "content": "What is 12 in words?"},
                                        {"role": "assistant", "content": reply}], tokenize=True)
        assert ids == full
        scored = [t for t in labels if t != -100]
        # the reply's tokens and the end token that closes it, nothing of the prompt
        assert tok.decode(scored, skip_special_tokens=False) == reply + "</s>"
    lengths = [len(pair["chosen_ids"]), len(pair["rejected_ids"])]
    assert stats == {"rows": 1, "pairs": 1, "truncated": 0, "tokens": sum(lengths),
                     "longest": max(lengths), "longest_line": 1}


def test_chat_row_scores_only_the_final_reply(tok):
    messages = [{"role": "user", "content": "Write 3 in words."},
                {"role": "assistant", "content": "three"},
                {"role": "user", "content": "And 4?"}]
    (pair,), _ = tokenize_preferences([{"messages": messages, "chosen": "four",
                                        "rejected": {"role": "assistant", "content": "fourteen"}}],
                                      tok, 64)
    scored = [t for t in pair["rejected_labels"] if t != -100]
    assert tok.decode(scored, skip_special_tokens=False) == "fourteen</s>"  # not "three"
    assert tok.decode(pair["chosen_ids"], skip_special_tokens=False).count("three") == 1


def test_load_preferences_reads_file_and_skips_blank_lines(tok, tmp_path):
    path = write_rows(tmp_path, [{"prompt": "a", "chosen": "1", "rejected": "2"}, "",
                                 {"prompt": "b", "chosen": "3", "rejected": "4"}])
    pairs, stats = load_preferences(path, tok, 32)
    assert stats["pairs"] == 2 and len(pairs) == 2


@pytest.mark.parametrize("row, words", [
    ({"prompt": "a", "chosen": "1"}, "needs 'prompt'"),
    ({"chosen": "1", "rejected": "2"}, "needs 'prompt'"),
    ({"prompt": "a", "chosen": "", "rejected": "2"}, "field 'chosen' must be a non-empty string"),
    ({"prompt": "a", "chosen": "1", "rejected": 2}, "field 'rejected' must be a non-empty string"),
    ({"prompt": "a", "chosen": "same", "rejected": "same"}, "are the same reply"),
    ({"prompt": "", "chosen": "1", "rejected": "2"}, "field 'prompt' must be a non-empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
      "chosen": "1", "rejected": "2"}, "must end with the user's turn"),
    ({"messages": [{"role": "user"}], "chosen": "1", "rejected": "2"}, "messages[0]"),
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "invalid JSON"),
    ({"prompt": "a\u0000b", "chosen": "1", "rejected": "2"},
     "field 'prompt' holds a NUL character (\\u0000) at offset 1"),
    ({"prompt": "a", "chosen": "1", "rejected": "\u0000"}, "field 'rejected' holds a NUL character"),
    ({"messages": [{"role": "user", "content": "q\u0000"}], "chosen": "1", "rejected": "2"},
     "messages[0].content holds a NUL character"),
    ({"prompt": "a", "chosen": "</s>", "rejected": "2"},
     "field 'chosen' holds only special tokens ('</s>')"),
])
def test_bad_rows_name_file_and_line(tok, tmp_path, row, words):
    path = write_rows(tmp_path, [{"prompt": "ok", "chosen": "1", "rejected": "2"}, row])
    with pytest.raises(ValueError) as err:
        load_preferences(path, tok, 32)
    assert f"{path}:2" in str(err.value) and words in str(err.value)


def test_truncation_counts_and_a_prompt_that_leaves_no_reply_is_an_error(tok, tmp_path):
    row = {"prompt": "one two three four five six", "chosen": "seven eight nine ten",
           "rejected": "eleven"}
    full, _ = tokenize_preferences([row], tok, 64)
    cut = len(full[0]["chosen_ids"]) - 2
    (pair,), stats = tokenize_preferences([row], tok, cut)
    assert stats["truncated"] == 1 and len(pair["chosen_ids"]) == cut
    assert (stats["longest"], stats["longest_line"]) == (cut + 2, 1)  # counted before the cut
    path = write_rows(tmp_path, [row])
    with pytest.raises(ValueError, match=rf"{path}:1: the prompt fills max_length=5"):
        load_preferences(path, tok, 5)


def test_collate_puts_chosen_rows_first_and_pads_right():
    pairs = [{"chosen_ids": [1, 5, 6], "chosen_labels": [-100, 5, 6], "rejected_ids": [1, 7],
              "rejected_labels": [-100, 7], "ref_logps": (-1.5, -2.5)},
             {"chosen_ids": [1, 8], "chosen_labels": [-100, 8], "rejected_ids": [1, 9, 9, 9],
              "rejected_labels": [-100, 9, 9, 9], "ref_logps": (-3.0, -4.0)}]
    batch = collate_pairs(pairs, pad_id=0, indices=[4, 2])
    assert batch["input_ids"].tolist() == [[1, 5, 6, 0], [1, 8, 0, 0], [1, 7, 0, 0], [1, 9, 9, 9]]
    assert batch["labels"][1].tolist() == [-100, 8, -100, -100]
    assert batch["attention_mask"].sum(1).tolist() == [3, 2, 2, 4]
    assert batch["pair_index"].tolist() == [4, 2]
    assert batch["ref_logps"].tolist() == [-1.5, -3.0, -2.5, -4.0]
    del pairs[1]["ref_logps"]  # a partly scored batch carries no reference at all
    assert "ref_logps" not in collate_pairs(pairs, pad_id=0)


def test_pair_batches_cover_every_pair_once_and_are_seeded():
    pairs = [{"chosen_ids": [1] * (2 + i % 5), "chosen_labels": [1] * (2 + i % 5),
              "rejected_ids": [1, 2], "rejected_labels": [1, 2]} for i in range(11)]
    batches = pair_batches(pairs, 3, pad_id=0, seed=1)
    seen = torch.cat([b["pair_index"] for b in batches]).tolist()
    assert sorted(seen) == list(range(11))
    again = pair_batches(pairs, 3, pad_id=0, seed=1)
    assert [b["pair_index"].tolist() for b in again] == [b["pair_index"].tolist() for b in batches]
    other = pair_batches(pairs, 3, pad_id=0, seed=2)
    assert [b["pair_index"].tolist() for b in other] != [b["pair_index"].tolist() for b in batches]
    assert data_fingerprint(pairs) != data_fingerprint(pairs[:-1])
    changed = [dict(p) for p in pairs]
    changed[3] = dict(changed[3], rejected_labels=[-100, 2])
    assert data_fingerprint(changed) != data_fingerprint(pairs)
