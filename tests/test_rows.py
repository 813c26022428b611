"""Row formats beyond chat/alpaca/prompt-completion: ShareGPT and raw text; unknown roles and
templates that raise are one-line errors naming file:line."""
import warnings

import pytest
from test_data import CHAT, PROMPT, tok, tok_dir, trained_runs, write_jsonl  # noqa: F401  (fixtures)

from minift.data.sft import load_dataset, row_to_messages, tokenize_rows
from minift.models.tokenizer import load_tokenizer
from minift.names import IGNORE_INDEX

SHAREGPT = {"conversations": [
    {"from": "system", "value": "Be kind."},
    {"from": "human", "value": "Hi"},
    {"from": "gpt", "value": "Hello! How can I help?"},
    {"from": "human", "value": "Capital of France?"},
    {"from": "gpt", "value": "Paris."}]}


def test_sharegpt_rows_train_like_the_same_chat(tok):
    assert row_to_messages(SHAREGPT) == CHAT["messages"]
    (share, chat), _ = tokenize_rows([SHAREGPT, CHAT], tok, max_length=512)
    assert share == chat
    assert trained_runs(tok, share) == ["Hello! How can I help?<|im_end|>", "Paris.<|im_end|>"]


@pytest.mark.parametrize("row,match", [
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
     r"d.jsonl:2: unknown role 'bot' in messages\[1\]; role must be one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "Assistant", "content": "b"}]},
     r"d.jsonl:2: unknown role 'Assistant'"),
    ({"messages": [{"role": "human", "content": "a"}, {"role": "gpt", "content": "b"}]},
     r"d.jsonl:2: unknown role 'human'"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     r"d.jsonl:2: unknown role 'bot' in conversations\[1\]; from must be one of system, human, gpt"),
    ({"conversations": [{"from": "human", "text": "a"}]},
     r"d.jsonl:2: conversations\[0\] must have string 'from' and 'value'"),
])
def test_unknown_roles_are_errors_not_dropped_rows(tmp_path, tok, row, match):
    import json
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(PROMPT), json.dumps(row)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "dropped" warning: an error
        with pytest.raises(ValueError, match=match):
            load_dataset(path, tok, 128)


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize("row,match", [
    # an empty reply would train the model to end its turn at once
    ({"messages": [USER, {"role": "assistant", "content": ""}]},
     r"d.jsonl:2: messages\[1\].content, an assistant reply, is empty; write the reply"),
    ({"messages": [USER, {"role": "assistant", "content": " \n"}]}, r"messages\[1\].content, an assistant reply, is empty"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
     r"d.jsonl:2: conversations\[1\].value, an assistant reply, is empty"),
    ({"instruction": "a", "output": ""}, r"d.jsonl:2: 'output', an assistant reply, is empty"),
    ({"prompt": "a", "completion": ""}, r"d.jsonl:2: 'completion', an assistant reply, is empty"),
    # special tokens only: no words to learn, markers where words belong
    ({"text": "<s></s>"}, r"d.jsonl:2: field 'text' holds only special tokens \('<s></s>'\)"),
    ({"text": "<|im_end|>\n<|im_start|>"}, r"d.jsonl:2: field 'text' holds only special tokens"),
    ({"messages": [USER, {"role": "assistant", "content": "<|im_end|>"}]},
     r"d.jsonl:2: messages\[1\].content, an assistant reply, holds only special tokens"),
    ({"prompt": "a", "completion": "</s> </s>"}, r"d.jsonl:2: 'completion', an assistant reply, holds only"),
    ({"text": "   "}, r"d.jsonl:2: field 'text' is empty"),
    # NUL characters ("\u0000" in JSON) come from binary files and broken exports
    ({"messages": [USER, {"role": "assistant", "content": "ok\u0000"}]},
     r"d.jsonl:2: messages\[1\].content holds a NUL character \(\\u0000\) at offset 2; that is "
     r"binary data"),
    ({"text": "\u0000abc"}, r"d.jsonl:2: field 'text' holds a NUL character \(\\u0000\) at offset 0"),
    ({"instruction": "a", "input": "b\u0000", "output": "c"}, r"d.jsonl:2: field 'input' holds a NUL"),
    ({"conversations": [{"from": "human", "value": "\u0000"}, {"from": "gpt", "value": "b"}]},
     r"d.jsonl:2: conversations\[0\].value holds a NUL"),
])
def test_empty_replies_special_tokens_only_and_nul_are_errors_naming_the_field(tmp_path, tok, row,
                                                                               match):
    import json
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(PROMPT), json.dumps(row)])
    with pytest.raises(ValueError, match=match):
        load_dataset(path, tok, 128)


def test_text_rows_train_every_token_and_end_with_eos(tok):
    (ex,), stats = tokenize_rows([{"text": "Paris is the capital of France."}], tok, max_length=64)
    assert ex["labels"] == ex["input_ids"] and IGNORE_INDEX not in ex["labels"]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"]) == "Paris is the capital of France."
    assert stats.trained_tokens == len(ex["input_ids"]) - 1  # the first token is never predicted
    with pytest.raises(ValueError, match=r"<data>:1: field 'text' must be a string, got int"):
        tokenize_rows([{"text": 5}], tok, max_length=64)


def test_dropped_rows_say_why(tok):
    long_prompt = {"prompt": "Write a short poem about the sea. " * 20, "completion": "Waves."}
    no_reply = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.warns(UserWarning, match=r"x.jsonl: dropped 2 row\(s\) with no trainable tokens: 1 "
                                         r"whose replies start after max_length=44 tokens and 1 "
                                         r"without an assistant reply to train on \(first at line 2\)"):
        tokenize_rows([PROMPT, long_prompt, no_reply], tok, max_length=44, source="x.jsonl")


def test_a_template_that_raises_is_one_line_naming_the_row(tok_dir):
    huge = load_tokenizer(tok_dir, chat_template="{% for i in range(10**9) %}x{% endfor %}")
    with pytest.raises(ValueError, match=r"x.jsonl:1: chat template error: OverflowError: .*range") as err:
        tokenize_rows([PROMPT], huge, 64, source="x.jsonl")
    assert "\n" not in str(err.value)
    zero = load_tokenizer(tok_dir, chat_template="{{ 1 // 0 }}")
    with pytest.raises(ValueError, match=r"x.jsonl:1: chat template error: ZeroDivisionError"):
        tokenize_rows([PROMPT], zero, 64, source="x.jsonl")
