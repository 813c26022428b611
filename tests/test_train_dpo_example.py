"""examples/train_dpo.py end to end with tiny step counts (its main() in this process: an
interpreter start-up costs more than the run), and the shipped preference data built by
examples/make_preferences.py."""
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_cases import LOSS_RTOL, free_port

import minift

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_dpo.py"
DATA = ROOT / "examples" / "data"


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_cli(*args, cwd=None):
    """train_dpo.main(args) with its stdout and stderr captured."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # train_dpo imports train_llama beside it
    script = importlib.import_module("train_dpo")
    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two on a busy 2-core CPU
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = script.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    return Result(code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    # no SFT adapter yet: the script trains one first (2 steps here), then 2 DPO steps
    proc = run_cli("--sft-adapter", tmp / "sft" / "adapter", "--sft-steps", "2", "--max-steps", "2",
                   "--eval-samples", "4", "--batch-size", "4", "--output", tmp / "dpo",
                   "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_trains_the_missing_sft_adapter_then_dpo(dpo_run):
    tmp, proc = dpo_run
    assert "is missing: training it first" in proc.stdout
    assert (tmp / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((tmp / "dpo" / "summary.json").read_text())
    assert summary["objective"] == "dpo" and summary["steps"] == 2
    for when in ("before", "after"):
        r = summary[when]
        assert {"eval_loss", "eval_reward_accuracy", "eval_logp_accuracy"} <= set(r)
        assert r["task"]["samples"] == 4 and 0 <= r["task"]["exact_match"] <= 1
    # before training the policy is its reference: every pair's loss is log 2, no reward yet
    assert summary["before"]["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert summary["before"]["eval_reward_margin"] == 0.0
    assert summary["forgetting"]["before"] == summary["before"]["general"]["perplexity"]
    table = proc.stdout[proc.stdout.index("reward accuracy (held-out pairs)"):]
    for row in ("right answer more likely", "exact match (held-out chat)", "general-text perplexity"):
        assert row in table


def test_saved_adapter_applies_to_the_saved_sft_model(dpo_run):
    tmp, _ = dpo_run
    out = tmp / "dpo"
    base = minift.load_model(out / "sft_merged", dtype=torch.float32)
    model = minift.load_adapter(base, out / "adapter")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "sft_merged")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.slow
def test_under_torchrun_matches_one_process(dpo_run, tmp_path):
    """The same flags on 2 gloo processes (FSDP), SFT adapter included: the losses of one process,
    one summary and one set of outputs written by rank 0."""
    one_dir, _ = dpo_run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(SCRIPT), "--sft-adapter", str(tmp_path / "sft" / "adapter"), "--sft-steps", "2",
           "--max-steps", "2", "--eval-samples", "4", "--batch-size", "4", "--output", str(tmp_path / "dpo"),
           "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reward accuracy (held-out pairs)") == 1  # rank 0 alone prints
    two = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    one = json.loads((one_dir / "dpo" / "summary.json").read_text())
    assert (two["world_size"], two["parallel"], one["world_size"]) == (2, "fsdp", 1)
    for key in ("first_loss", "last_loss", "eval_loss"):
        assert two[key] == pytest.approx(one[key], rel=LOSS_RTOL)
    assert two["after"]["eval_loss"] == pytest.approx(one["after"]["eval_loss"], rel=LOSS_RTOL)
    model = minift.load_adapter(minift.load_model(tmp_path / "dpo" / "sft_merged", dtype=torch.float32),
                                tmp_path / "dpo" / "adapter")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_qlora_with_precomputed_reference_and_no_forgetting_check(dpo_run, tmp_path):
    tmp, _ = dpo_run  # its SFT adapter, trained by the first run
    out = tmp_path / "dpo"
    proc = run_cli("--sft-adapter", tmp / "sft" / "adapter", "--method", "qlora",
                   "--precompute-reference", "--general", "", "--max-steps", "2",
                   "--eval-samples", "4", "--batch-size", "4", "--output", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["method"], summary["steps"], summary["forgetting"]) == ("qlora", 2, None)
    # minift.train runs method "qlora" only on an NF4 base with LoRA adapters and nothing else
    # trainable: the SFT model went to NF4 under the fresh adapter
    assert summary["trainable_params"] == 77_824 < summary["total_params"]
    for name in ("reference_logps.safetensors", "eval_reference_logps.safetensors"):
        assert (out / name).is_file()  # scored once before step 1, then read from disk
    assert summary["before"]["eval_loss"] == pytest.approx(0.693147, abs=1e-5)
    assert "general-text perplexity" not in proc.stdout and "general" not in summary["before"]
    # sft_merged holds the dequantized NF4 weights the adapter was trained on, in the base's dtype
    assert json.loads((out / "sft_merged" / "config.json").read_text())["torch_dtype"] == "float32"
    assert "are stored as" not in proc.stderr  # one dtype, not bf16 linears beside fp32 norms
    model = minift.load_adapter(minift.load_model(out / "sft_merged", dtype=torch.float32), out / "adapter")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_train_config_errors_name_this_scripts_flags():
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    script = importlib.import_module("train_dpo")
    assert script.in_flags("TrainConfig.dpo_beta must be a finite number > 0, got 0",
                           script.FLAG_OF_FIELD) == "--beta must be a finite number > 0, got 0"
    assert script.in_flags("TrainConfig.precompute_reference=True", script.FLAG_OF_FIELD) == \
        "--precompute-reference"


def test_under_torchrun_rank_1_exits_2_without_printing(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    proc = run_cli("--beta", "0")
    assert (proc.returncode, proc.stderr) == (2, "")


@pytest.mark.parametrize("flags, words", [
    (["--beta", "0"], "argument --beta: must be > 0, got 0"),
    (["--data", "{tmp}/bad.jsonl"], "--data: {tmp}/bad.jsonl:2: a preference row needs 'prompt'"),
    (["--loss", "kto"], "argument --loss: invalid choice"),
    (["--general", "{tmp}/nowhere.jsonl"], "--general {tmp}/nowhere.jsonl: no such file"),
    (["--seq-len", "16"], "--data {data}/dpo_train.jsonl: 677 sequence(s) longer than --seq-len 16 "
                          "tokens (the longest, line 2, has 23); raise --seq-len to 23"),
    (["--seq-len", "100000"], "--seq-len 100000 is more than the model's max_position_embeddings 512"),
    (["--r", "100000"], "--r 100000 is more than the dimensions of every adapted layer"),
    (["--fsdp-cpu-offload"], "--fsdp-cpu-offload moves FSDP's shards to host memory, and this is "
                             "one process"),
    (["--method", "full"], "argument --method: invalid choice: 'full'"),
])
def test_bad_input_is_one_line_before_any_training(tmp_path, flags, words):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "1", "rejected": "2"}\n'
                                        '{"prompt": "q", "chosen": "1"}\n')
    flags = [f.format(tmp=tmp_path) for f in flags]
    proc = run_cli(*flags, "--sft-adapter", tmp_path / "none", "--device", "cpu",
                   "--output", tmp_path / "o")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("train_dpo.py: error: ")
    assert words.format(tmp=tmp_path, data=DATA) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "training it first" not in proc.stdout and not (tmp_path / "none").exists()


def test_shipped_pairs_are_near_misses_of_the_shipped_answers():
    pairs = [json.loads(x) for x in (DATA / "dpo_eval.jsonl").read_text().splitlines()]
    chats = [json.loads(x) for x in (DATA / "eval.jsonl").read_text().splitlines()]
    assert len(pairs) == len(chats) == 100
    digit_pairs = 0
    for p, c in zip(pairs, chats):
        assert p["prompt"] == c["messages"][0]["content"]
        assert p["chosen"] == c["messages"][1]["content"] != p["rejected"]
        if p["chosen"].isdigit():  # one digit changed, same number of digits
            digit_pairs += 1
            assert len(p["rejected"]) == len(p["chosen"])
            assert sum(a != b for a, b in zip(p["chosen"], p["rejected"])) == 1
    assert digit_pairs > 20
    train = (DATA / "dpo_train.jsonl").read_text().splitlines()
    assert len(train) == 800
