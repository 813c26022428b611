"""examples/train_llama.py end to end (as a subprocess) and the shipped base checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minift

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_llama.py"
BASE = ROOT / "examples" / "base"
EVAL = ROOT / "examples" / "data" / "eval.jsonl"
FAST = ["--max-steps", "3", "--eval-samples", "4", "--device", "cpu"]


def run_cli(*args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=kwargs.get("cwd", ROOT))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run")
    proc = run_cli(*FAST, "--output", out, "--merge")
    assert proc.returncode == 0, proc.stderr
    return out, proc


def token_batch(vocab, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_run_prints_before_and_after(lora_run):
    _, proc = lora_run
    assert "before: exact match" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("exact match (held-out)")]
    assert len(table) == 1 and table[0].count("/4 = ") == 2  # before and after, on 4 samples
    assert "eval loss (reply tokens)" in proc.stdout


def test_summary_records_both_evaluations(lora_run):
    out, _ = lora_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["steps"] == 3
    for when in ("before", "after"):
        result = summary[when]
        assert result["total"] == 4 and 0 <= result["correct"] <= 4
        assert result["exact_match"] == result["correct"] / 4
        assert 0 < result["eval_loss"] < 50
    # three LoRA steps at a high learning rate lower the held-out loss
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["saved"]["adapter"] == str(out / "adapter")


def test_adapter_loads_and_matches_merged_export(lora_run):
    out, _ = lora_run
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    model = minift.load_model(BASE, dtype=torch.float32)
    base_logits = model(token_batch(model.config.vocab_size))
    minift.lora_wrap(model, r=8, alpha=16)
    minift.load_adapter(model, out / "adapter")
    adapted = model(token_batch(model.config.vocab_size))
    assert not torch.allclose(adapted, base_logits, atol=1e-4)  # the adapter changed the model
    merged = minift.load_model(out / "merged", dtype=torch.float32)
    torch.testing.assert_close(merged(token_batch(model.config.vocab_size)), adapted,
                               atol=1e-4, rtol=1e-4)


def test_merged_export_loads_in_transformers(lora_run):
    transformers = pytest.importorskip("transformers")
    out, _ = lora_run
    ours = minift.load_model(out / "merged", dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
    ids = token_batch(ours.config.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    tok = minift.load_tokenizer(out / "merged")
    assert tok.chat_template == minift.load_tokenizer(BASE).chat_template


def test_shipped_base_loads_in_transformers():
    transformers = pytest.importorskip("transformers")
    ours = minift.load_model(BASE, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    ids = token_batch(ours.config.vocab_size, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    total = sum(f.stat().st_size for f in BASE.iterdir())
    assert total < 12 * 2**20


def test_shipped_tokenizer_renders_chat_rows():
    tok = minift.load_tokenizer(BASE)
    row = json.loads(EVAL.read_text().splitlines()[0])
    prompt = tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True)
    full = tok.apply_chat_template(row["messages"])
    assert full.startswith(prompt) and prompt.endswith("<|assistant|>")
    assert full == prompt + row["messages"][-1]["content"] + tok.eos_token
    assert tok.decode(tok.encode("347 is written as three hundred forty-seven.")) == \
        "347 is written as three hundred forty-seven."


BAD_INPUTS = {  # case -> (arguments, text the error line must contain)
    "negative lr": (["--lr", "-1"], "--lr"),
    "zero seq-len": (["--seq-len", "0"], "--seq-len"),
    "unknown method": (["--method", "dora"], "--method"),
    "unknown optimizer": (["--optimizer", "sgd"], "--optimizer"),
    "not a checkpoint": (["--model", "{tmp}"], "config.json"),
    "bad rows": (["--data", "{tmp}/bad.jsonl"], "bad.jsonl:2"),
    "resume other method": (["--output", "{run}", "--method", "full", "--resume"],
                            "method 'lora'"),
    "resume other model": (["--output", "{run}", "--r", "4", "--resume"], "different model"),
}


@pytest.fixture(scope="module")
def bad_runs(lora_run, tmp_path_factory):
    """Every bad-input case, started at once (each is one interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                                   '{"text": 1}\n')
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {}
    for case, (args, _) in BAD_INPUTS.items():
        args = [a.format(tmp=tmp, run=lora_run[0]) for a in args]
        if "--output" not in args:
            args += ["--output", str(tmp / "out")]
        procs[case] = subprocess.Popen([sys.executable, str(SCRIPT), *FAST, *args], cwd=ROOT,
                                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
    stderr = {case: p.communicate(timeout=300)[1] for case, p in procs.items()}
    return {case: (p.returncode, stderr[case]) for case, p in procs.items()}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, bad_runs):
    code, stderr = bad_runs[case]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("train_llama.py: error: ")
    assert BAD_INPUTS[case][1] in stderr
