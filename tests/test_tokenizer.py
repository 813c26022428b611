"""minift.models.tokenizer against transformers' tokenizer on the same files (oracle tests)."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from minift.models.chat_templates import BUILTIN_TEMPLATES
from minift.models.tokenizer import load_tokenizer

SPECIALS = ["<s>", "</s>", "<unk>", "<pad>", "<|im_start|>", "<|im_end|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.",
          "Fine-tuning adapts a pretrained model to new data.",
          "What is the capital of France? Paris is the capital of France.",
          "Write a haiku about autumn leaves falling softly.",
          "Numbers like 42 and 3.14 appear, with émojis and accents: café."] * 3


def build_tokenizer(specials=SPECIALS):
    """A small byte-level BPE trained on a few sentences; any text encodes without UNK."""
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(CORPUS, trainer)
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return tk


def write_checkpoint(folder, config, specials=SPECIALS, tokens_map=None):
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(specials).save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if tokens_map is not None:
        (folder / "special_tokens_map.json").write_text(json.dumps(tokens_map))
    return folder


BASE_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False,
                             "normalized": False, "single_word": False},
               "unk_token": "<unk>", "clean_up_tokenization_spaces": False}

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer briefly."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And a haiku about autumn?"}],
    [{"role": "system", "content": "Be kind."},
     {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count: 42, 3.14"},
     {"role": "assistant", "content": "  42 and 3.14  "}],
]

CUSTOM = ("{% for m in messages %}{% if m['role'] == 'system' %}[SYS]{{ m['content'] }}\n"
          "{% else %}{{ m['role'] | upper }}: {{ m['content'] }}{% if m['role'] == 'assistant' %}"
          "{{ eos_token }}{% endif %}\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}ASSISTANT:{% endif %}{{ {'n': messages|length} | tojson }}")


@pytest.fixture
def folder(tmp_path):
    return write_checkpoint(tmp_path / "tok", BASE_CONFIG)


def test_encode_decode_match_transformers(folder):
    ours = load_tokenizer(folder)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    for text in CORPUS[:5] + ["unseen wörds ∑ and <|im_start|>special<|im_end|> tokens"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
    assert ours.vocab_size == len(ref)
    assert ours.bos_token == "<s>" and ours.eos_token == "</s>"
    assert ours.eos_token_id == ref.eos_token_id


def test_pad_falls_back_to_eos_and_tokens_map_fills_gaps(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    tok = load_tokenizer(write_checkpoint(tmp_path / "a", config))
    assert tok.pad_token is None and tok.pad_token_id == tok.eos_token_id
    tok = load_tokenizer(write_checkpoint(tmp_path / "b", config, tokens_map={
        "pad_token": {"content": "<pad>", "normalized": False}, "eos_token": "<unk>"}))
    assert tok.pad_token == "<pad>" and tok.pad_token_id == tok.token_to_id("<pad>")
    assert tok.eos_token == "</s>"  # tokenizer_config.json wins over special_tokens_map.json


def test_add_bos_token_from_config_like_llama_tokenizers(tmp_path):
    # tokenizer.json's own post-processor adds nothing; the config's flags decide, as Llama
    # tokenizers do, and save() bakes them into tokenizer.json so transformers agrees.
    folder = write_checkpoint(tmp_path / "t", {**BASE_CONFIG, "add_bos_token": True, "add_eos_token": True})
    ours, ref = load_tokenizer(folder), PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    text = "The quick brown fox"
    ids = ours.encode(text, add_special_tokens=True)
    assert ids == [ours.bos_token_id] + ref.encode(text, add_special_tokens=False) + [ours.eos_token_id]
    assert ours.encode(text) == ids[1:-1]
    ours.save(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "saved")).encode(text) == ids
    off = write_checkpoint(tmp_path / "off", {**BASE_CONFIG, "add_bos_token": False})
    assert load_tokenizer(off).encode(text, add_special_tokens=True) == ids[1:-1]


def test_missing_special_token_is_added(tmp_path):
    folder = write_checkpoint(tmp_path / "t", {**BASE_CONFIG, "pad_token": "<my_pad>"})
    ours, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.pad_token_id == ref.pad_token_id == ours.vocab_size - 1
    assert ours.encode("a<my_pad>") == ref.encode("a<my_pad>", add_special_tokens=False)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES) + ["custom"])
def test_chat_template_matches_transformers(tmp_path, name):
    template = CUSTOM if name == "custom" else BUILTIN_TEMPLATES[name]
    folder = write_checkpoint(tmp_path / "t", {**BASE_CONFIG, "chat_template": template})
    ours, ref = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.chat_template == template
    for chat in CHATS:
        for gen in (False, True):
            if name == "llama-2" and chat[-1]["role"] == "assistant" and gen:
                continue  # a generation prompt after a reply makes no sense for [INST] pairs
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            ids = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            assert ids == ref.encode(text, add_special_tokens=False)
    if name != "custom":
        # the generation prompt is a prefix of the conversation with the reply (minift.data.sft needs it)
        chat = CHATS[2]
        assert ours.apply_chat_template(chat).startswith(
            ours.apply_chat_template(chat[:-1], add_generation_prompt=True))


def test_builtin_template_renders_expected_llama3_text(tmp_path):
    tok = load_tokenizer(write_checkpoint(tmp_path / "t", BASE_CONFIG), chat_template="llama-3")
    text = tok.apply_chat_template([{"role": "user", "content": " Hi "}], add_generation_prompt=True)
    assert text == ("<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_named_template_list_takes_default(tmp_path):
    templates = [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": CUSTOM}]
    tok = load_tokenizer(write_checkpoint(tmp_path / "t", {**BASE_CONFIG, "chat_template": templates}))
    assert tok.chat_template == CUSTOM
    bad = write_checkpoint(tmp_path / "b", {**BASE_CONFIG, "chat_template": templates[:1]})
    with pytest.raises(ValueError, match=r"tokenizer_config.json.*tool_use.*no 'default'"):
        load_tokenizer(bad)


@pytest.mark.parametrize("specials,expected", [
    (SPECIALS, "llama-3"),
    (["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"], "chatml"),
    (["<s>", "</s>", "<unk>", "[INST]"], "llama-2"),
    (["<s>", "</s>", "<unk>"], "alpaca"),
])
def test_default_template_follows_vocabulary(tmp_path, specials, expected):
    tok = load_tokenizer(write_checkpoint(tmp_path / "t", BASE_CONFIG, specials=specials))
    assert tok.chat_template == BUILTIN_TEMPLATES[expected]


def test_explicit_template_overrides_checkpoint(tmp_path):
    folder = write_checkpoint(tmp_path / "t", {**BASE_CONFIG, "chat_template": CUSTOM})
    assert load_tokenizer(folder, chat_template="chatml").chat_template == BUILTIN_TEMPLATES["chatml"]
    with pytest.raises(ValueError, match=r"chat_template='vicuna'.*built-in templates"):
        load_tokenizer(folder, chat_template="vicuna")


def test_save_round_trip_loads_in_transformers(tmp_path):
    folder = write_checkpoint(tmp_path / "t", {**BASE_CONFIG, "pad_token": "<pad>", "add_bos_token": True},
                              )
    ours = load_tokenizer(folder, chat_template="chatml")
    ours.save(tmp_path / "saved")
    again, ref = load_tokenizer(tmp_path / "saved"), AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    chat = CHATS[2]
    assert again.chat_template == BUILTIN_TEMPLATES["chatml"]
    assert ref.apply_chat_template(chat, tokenize=False) == ours.apply_chat_template(chat)
    assert (ref.bos_token, ref.eos_token, ref.pad_token) == ("<s>", "</s>", "<pad>")
    assert ref.encode("fox jumps") == again.encode("fox jumps", add_special_tokens=True)
    assert again.encode("fox jumps", add_special_tokens=True)[0] == again.bos_token_id


def test_missing_tokenizer_json_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json not found: .*empty"):
        (tmp_path / "empty").mkdir()
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_bad_config_json_names_file_and_line(tmp_path):
    folder = write_checkpoint(tmp_path / "t", None)
    (folder / "tokenizer_config.json").write_text('{\n  "bos_token": "<s>",\n  "eos_token": </s>\n}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json:3: invalid JSON"):
        load_tokenizer(folder)


def test_non_utf8_config_names_file_and_line(tmp_path):
    folder = write_checkpoint(tmp_path / "t", None)
    (folder / "tokenizer_config.json").write_bytes(b'{\n  "bos_token": "<s>",\n  "x": "\xff"\n}')
    with pytest.raises(ValueError, match=r"tokenizer_config.json:3: not valid UTF-8"):
        load_tokenizer(folder)


def test_bad_special_token_names_key(tmp_path):
    folder = write_checkpoint(tmp_path / "t", {**BASE_CONFIG, "bos_token": {"text": "<s>"}})
    with pytest.raises(ValueError, match=r"tokenizer_config.json: bos_token"):
        load_tokenizer(folder)


def test_raise_exception_in_template_becomes_value_error(tmp_path):
    tok = load_tokenizer(write_checkpoint(tmp_path / "t", BASE_CONFIG), chat_template="llama-2")
    twice = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.apply_chat_template(twice)
    tok.chat_template = "{{ raise_exception('no tools here: ' ~ messages[0]['role']) }}"
    with pytest.raises(ValueError, match="no tools here: user"):
        tok.apply_chat_template(twice)
    with pytest.raises(ValueError, match="syntax error at line 2"):
        tok.chat_template = "ok\n{% if %}"


def test_strftime_now_is_available(tmp_path):
    tok = load_tokenizer(write_checkpoint(tmp_path / "t", BASE_CONFIG),
                         chat_template="{{ strftime_now('%Y') | length }}|{{ messages | length }}")
    assert tok.apply_chat_template(CHATS[1]) == "4|4"


def test_save_is_atomic(tmp_path, monkeypatch):
    import os

    ours = load_tokenizer(write_checkpoint(tmp_path / "t", BASE_CONFIG), chat_template="chatml")
    ours.save(tmp_path / "saved")
    before = {n: (tmp_path / "saved" / n).read_bytes() for n in os.listdir(tmp_path / "saved")}

    def killed(src, dst):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        load_tokenizer(tmp_path / "t", chat_template="llama-3").save(tmp_path / "saved")
    monkeypatch.undo()
    assert {n: (tmp_path / "saved" / n).read_bytes() for n in os.listdir(tmp_path / "saved")} == before
    assert load_tokenizer(tmp_path / "saved").chat_template == ours.chat_template
