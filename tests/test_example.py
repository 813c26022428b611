"""examples/train_llama.py end to end (as a subprocess) and the shipped base checkpoint."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minift
from minift.distributed.parallel import free_port

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
    out, proc = lora_run
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
    # the loop's own eval fields hold the final held-out evaluation, the same loss as "after"
    assert [e["step"] for e in summary["eval"]] == [3]
    assert summary["eval_loss"] == pytest.approx(summary["after"]["eval_loss"], rel=1e-6)
    assert 0 < summary["padding_efficiency"] <= 1
    assert proc.stdout.count("padding efficiency") == 1


def test_resume_on_the_same_base_continues(lora_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(lora_run[0], out)
    # killed after the manifest of step 3 was written, before its rename: the resume check must
    # see the recovered step-3, not refuse for want of a checkpoint
    os.rename(out / "step-3", out / ".tmp-step-3")
    proc = run_cli("--max-steps", "4", "--eval-samples", "4", "--device", "cpu", "--output", out,
                   "--resume")
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {out / 'step-3'} (step 3)" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] == str(out / "step-3")


def test_summary_has_the_merge_check_and_the_forgetting_check(lora_run):
    out, proc = lora_run
    summary = json.loads((out / "summary.json").read_text())
    check = summary["merge_check"]
    assert check["merged_into"] == "weights" and check["samples"] == 4
    assert check["max_abs_logit_diff"] < 1e-3 < check["max_logit"]
    assert "merge check: adapter merged into the base weights" in proc.stdout
    change = summary["forgetting"]
    for when in ("before", "after"):
        assert summary[when]["general"]["perplexity"] == change[when] > 1
        assert 0 <= summary[when]["token_f1"] <= 1 and 0 <= summary[when]["rouge_l"] <= 1
    assert change["relative_change"] == pytest.approx(change["after"] / change["before"] - 1)
    assert "general-text perplexity change" in proc.stdout and "token F1 / ROUGE-L" in proc.stdout



def test_qlora_forgetting_is_measured_against_the_original_base_too(tmp_path):
    # the NF4 base is already another model: its perplexity is not the "before" a user ships
    # against, so the original 16-bit base is scored as well, and the verdict uses it; the merged
    # model is saved in the checkpoint's dtype (float32 here) and checked as saved
    proc = run_cli(*FAST, "--method", "qlora", "--output", tmp_path, "--merge", "--merge-into", "original")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    nf4, original = summary["before"]["general"], summary["before"]["general_original"]
    assert nf4["perplexity"] != original["perplexity"] and nf4["tokens"] == original["tokens"]
    assert summary["forgetting"]["before"] == original["perplexity"]
    assert summary["forgetting_vs_nf4_base"]["before"] == nf4["perplexity"]
    assert "change against the original base" in proc.stdout and "change against the NF4 base" in proc.stdout
    assert summary["merge_check"]["dtype"] == "float32"
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32"


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
    "infinite lr": (["--lr", "inf"], "argument --lr: must be a finite number, got inf"),
    "nan lr": (["--lr", "nan"], "argument --lr: must be a finite number, got nan"),
    "infinite alpha": (["--alpha", "inf"], "argument --alpha: must be a finite number"),
    "nan alpha": (["--alpha", "nan"], "argument --alpha: must be a finite number"),
    "negative seed": (["--seed", "-5"], "argument --seed: must be >= 0, got -5"),
    "zero seq-len": (["--seq-len", "0"], "--seq-len"),
    "unknown method": (["--method", "dora"], "--method"),
    "unknown optimizer": (["--optimizer", "sgd"], "--optimizer"),
    "unknown device": (["--device", "bogus"], "argument --device: unknown device 'bogus'"),
    "output is a file": (["--output", "{tmp}/a_file"], "--output {tmp}/a_file: {tmp}/a_file exists "
                                                        "and is not a directory"),
    "not a checkpoint": (["--model", "{tmp}"], "config.json"),
    "string in config.json": (["--model", "{tmp}/string_eps"],
                              "{tmp}/string_eps/config.json: field 'rms_norm_eps' must be a finite "
                              "number > 0, got '1e-5'"),
    "integer weight": (["--model", "{tmp}/int_weight"],
                       "tensor 'model.layers.1.mlp.up_proj.weight' has dtype int64"),
    "bad rows": (["--data", "{tmp}/bad.jsonl"], "bad.jsonl:2"),
    "data not utf-8": (["--data", "{tmp}/latin1.jsonl"], "--data: {tmp}/latin1.jsonl:2: not valid UTF-8"),
    "resume other method": (["--output", "{run}", "--method", "full", "--resume"],
                            "method 'lora'"),
    "resume other model": (["--output", "{run}", "--r", "4", "--resume"], "different model"),
    "resume other base": (["--output", "{run}", "--model", "{tmp}/half_base", "--resume"],
                          "--resume: {run}/step-3: checkpoint was trained on a different base model: "
                          "frozen tensor 'model.embed_tokens.weight' differs"),
    "resume other data": (["--output", "{run}", "--data", str(EVAL), "--resume"],
                          "--resume: {run}/step-3: train_data differs"),
    "fresh run into another run's folder": (["--output", "{run}"],
                                            "--output: output_dir {run} holds the checkpoints of an "
                                            "earlier run (step-3); continue it with"),
    "hub id": (["--model", "meta-llama/Llama-3.2-1B"],
               "'meta-llama/Llama-3.2-1B' is not a folder: minift reads checkpoints from local "
               "folders"),
    "resume file gone": (["--output", "{tmp}/gone", "--resume", "{tmp}/gone/step-3"],
                         "--resume: resume_from: {tmp}/gone/step-3: model.safetensors is missing"),
    "merge into original without nf4": (["--merge", "--merge-into", "original"],
                                        "--merge-into original: only a qlora base is quantized"),
    "bad general text": (["--general", "{tmp}/bad.jsonl"], "--general: {tmp}/bad.jsonl:1: field 'text'"),
}
if not torch.cuda.is_available():
    BAD_INPUTS["cuda without cuda"] = (["--device", "cuda"], "argument --device: cuda: CUDA is not "
                                                             "available on this machine")


def copy_base(to, weights=None, config=None):
    """examples/base copied to `to`, with its weights or config.json changed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(BASE, to)
    if weights is not None:
        tensors = load_file(to / "model.safetensors")
        save_file(weights(tensors), to / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (to / "config.json").write_text(json.dumps(config(json.loads((to / "config.json").read_text()))))


@pytest.fixture(scope="module")
def bad_runs(lora_run, tmp_path_factory):
    """Every bad-input case, four at a time (each is one interpreter start-up)."""
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n'
                                   '{"text": 1}\n')
    (tmp / "latin1.jsonl").write_bytes(EVAL.read_bytes().splitlines(keepends=True)[0]
                                       + '{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"))
    (tmp / "a_file").write_text("not a directory\n")
    copy_base(tmp / "string_eps", config=lambda c: dict(c, rms_norm_eps="1e-5"))
    copy_base(tmp / "int_weight", weights=lambda t: dict(
        t, **{"model.layers.1.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"].long()}))
    # the same shapes as the base the LoRA run was trained on, other weights
    copy_base(tmp / "half_base", weights=lambda t: {k: v * 0.5 for k, v in t.items()})
    shutil.copytree(lora_run[0], tmp / "gone")
    os.remove(tmp / "gone" / "step-3" / "model.safetensors")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results, pending = {}, list(BAD_INPUTS.items())
    while pending:
        batch, pending = pending[:4], pending[4:]
        procs = {}
        for case, (args, _) in batch:
            args = [a.format(tmp=tmp, run=lora_run[0]) for a in args]
            if "--output" not in args:
                args += ["--output", str(tmp / "out")]
            procs[case] = subprocess.Popen([sys.executable, str(SCRIPT), *FAST, *args], cwd=ROOT,
                                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True)
        for case, p in procs.items():
            stdout, stderr = p.communicate(timeout=300)
            results[case] = (p.returncode, stdout, stderr)
    return results, {"tmp": tmp, "run": lora_run[0]}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(case, bad_runs):
    results, names = bad_runs
    code, stdout, stderr = results[case]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("train_llama.py: error: ")
    assert BAD_INPUTS[case][1].format(**names) in stderr
    assert "before: exact match" not in stdout  # refused before any evaluation or training


def test_config_errors_name_the_flag():
    # argparse checks each flag's own range; a value TrainConfig still refuses is reported under
    # the flag that set it, not the TrainConfig field.
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_llama", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(["--device", "cpu"])
    args.device_type, args.lr = "cpu", float("inf")
    with pytest.raises(script.UsageError, match=r"^--lr must be a finite number in \(0, 3.4e37\), got inf$"):
        script.make_config(args, pad_id=0)
    args.lr, args.seed = None, -1
    with pytest.raises(script.UsageError, match=r"^--seed must be an integer in \[0, 2\*\*32\), got -1$"):
        script.make_config(args, pad_id=0)
    # the field=value words of TrainConfig's rules are the flags a user types, too
    args.seed, args.optimizer_in_backward, args.max_grad_norm, args.grad_accum = 0, True, 0, 4
    with pytest.raises(script.UsageError, match=r"^--optimizer-in-backward needs --grad-accum 1 "
                                                r"\(.*\); got --grad-accum 4$"):
        script.make_config(args, pad_id=0)
    args.optimizer_in_backward, args.activation_offload = False, True
    with pytest.raises(script.UsageError, match=r"^--activation-offload moves the inputs that "
                                                r"gradient checkpointing keeps; set "
                                                r"--gradient-checkpointing as well$"):
        script.make_config(args, pad_id=0)


def test_train_config_words_become_flags():
    script = _script()
    assert script.in_flags("TrainConfig.optimizer_in_backward=True with parallel='fsdp' is not "
                           "supported") == "--optimizer-in-backward with --parallel fsdp is not supported"
    assert script.in_flags("continue it with resume_from='latest' (--resume), or train into a new "
                           "output_dir (--output)") == ("continue it with --resume, or train into a "
                                                        "new output_dir (--output)")
    assert script.in_flags("TrainConfig.paged_device_budget=None") == "--paged-device-budget all"
    assert script.in_flags("checkpoint was trained with method 'lora'") == \
        "checkpoint was trained with method 'lora'"  # a bare word in a sentence is no field


def test_mlp_tile_size_and_paged_device_budget_reach_the_config():
    script = _script()

    def config(*flags):
        args = script.parse_args(["--device", "cpu", *flags])
        args.device_type = "cpu"
        return script.make_config(args, pad_id=0)

    assert (config().mlp_tile_size, config().paged_device_budget) == (None, 2**30)
    paged = ["--optimizer", "paged_adamw8bit", "--paged-device-budget"]
    assert config(*paged, "512MiB").paged_device_budget == 512 * 2**20
    assert config(*paged, "2GB").paged_device_budget == 2 * 10**9
    assert config(*paged, "0").paged_device_budget == 0
    assert config(*paged, "all").paged_device_budget is None
    assert config("--mlp-tile-size", "256").mlp_tile_size == 256


@pytest.mark.slow  # four 3-step runs of the script
@pytest.mark.parametrize("method", ["lora", "full"])
def test_memory_features_on_equal_off(tmp_path, method):
    # chunking regroups fp32 sums (see docs/memory.md): losses agree to 1e-4 relative
    common = [*FAST, "--method", method, "--gradient-checkpointing", "--max-grad-norm", "0"]
    off = run_cli(*common, "--loss-chunk-size", "0", "--output", tmp_path / "off")
    on = run_cli(*common, "--loss-chunk-size", "16", "--activation-offload",
                 "--optimizer-in-backward", "--output", tmp_path / "on")
    assert off.returncode == 0 and on.returncode == 0, off.stderr + on.stderr
    losses = {}
    for name in ("off", "on"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in lines]
    assert len(losses["on"]) == 3
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)


def test_feature_flag_errors_name_the_flag():
    proc = run_cli("--device", "cpu", "--optimizer-in-backward", "--max-steps", "1")
    assert proc.returncode == 2
    assert proc.stderr.startswith("train_llama.py: error: --optimizer-in-backward cannot clip the "
                                  "global gradient norm")
    assert "set --max-grad-norm 0 (got 1.0)" in proc.stderr and "TrainConfig" not in proc.stderr


@pytest.fixture(autouse=True)
def _keep_warning_format(monkeypatch):
    """main() installs its one-line warning format for the process; tests get theirs back."""
    import warnings
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_llama", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_help_shows_every_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # a default path is never wrapped at one of its hyphens
    script = _script()
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    parser_defaults = vars(script.parse_args([]))
    for name, value in parser_defaults.items():
        if value is not None and not isinstance(value, bool):
            assert f"(default: {value})" in text, name
    assert "(default: 1e-3 full, 3e-3 lora/qlora)" in text and "(default: auto)" in text


def test_dtype_auto_is_float32_on_cpu_and_the_checkpoints_own_on_cuda(tmp_path):
    script = _script()
    copy_base(tmp_path / "bf16", config=lambda c: dict(c, torch_dtype="bfloat16"))
    args = script.parse_args(["--model", str(tmp_path / "bf16")])
    assert script.compute_dtype(args, args.model, torch.device("cpu")) == torch.float32
    assert script.compute_dtype(args, args.model, torch.device("cuda")) == torch.bfloat16
    args = script.parse_args(["--model", str(tmp_path / "bf16"), "--dtype", "float16"])
    assert script.compute_dtype(args, args.model, torch.device("cpu")) == torch.float16


@pytest.mark.parametrize("method", ["lora", "full"])
def test_saved_models_keep_the_checkpoints_dtype(tmp_path, method):
    from safetensors import safe_open

    script = _script()
    copy_base(tmp_path / "bf16", weights=lambda t: {k: v.bfloat16() for k, v in t.items()},
              config=lambda c: dict(c, torch_dtype="bfloat16"))
    args = script.parse_args(["--model", str(tmp_path / "bf16"), "--method", method, "--merge",
                              "--output", str(tmp_path / "out")])
    args.device_type = "cpu"
    tokenizer, model = script.load_base(args, torch.device("cpu"))
    assert model.lm_head.weight.dtype == torch.float32  # trained in float32 on a CPU
    saved = script.save_outputs(model, tokenizer, args, [torch.tensor([1, 5, 9, 14])])
    folder = Path(saved["merged" if method == "lora" else "model"])
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    size = (folder / "model.safetensors").stat().st_size
    assert size < 1.01 * (tmp_path / "bf16" / "model.safetensors").stat().st_size  # not doubled
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    if method == "lora":
        config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tmp_path / "bf16")


def test_a_full_disk_ends_the_run_with_one_line(monkeypatch, capsys):
    import errno

    script = _script()

    def full(args):
        raise OSError(errno.ENOSPC, "cannot save the checkpoint of step 2 in out: No space left on "
                                    "device; the newest intact checkpoint is out/step-1")

    monkeypatch.setattr(script, "run", full)
    assert script.main(["--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["train_llama.py: training stopped: [Errno 28] cannot save the checkpoint of step 2 "
                   "in out: No space left on device; the newest intact checkpoint is out/step-1"]



@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_says_why_training_stopped(monkeypatch, capsys, rank, said):
    script = _script()

    def diverge(args):
        raise FloatingPointError("training loss is nan at step 2; no checkpoint to go back to")

    monkeypatch.setattr(script, "run", diverge)
    monkeypatch.setenv("RANK", rank)
    assert script.main(["--device", "cpu"]) == 1  # every rank stops with the same code
    err = capsys.readouterr().err
    assert (err == "train_llama.py: training stopped: training loss is nan at step 2; no checkpoint "
                   "to go back to\n") if said else err == ""


def test_warnings_are_one_line(monkeypatch):
    import warnings

    script = _script()
    monkeypatch.setattr(script, "run", lambda args: None)
    assert script.main(["--device", "cpu"]) == 0
    text = warnings.formatwarning(UserWarning("step 3: gradient norm is exactly 0,\n  so no weight "
                                              "changes"), UserWarning, "trainer.py", 300)
    assert text == "train_llama.py: warning: step 3: gradient norm is exactly 0, so no weight changes\n"


# ---- input the script refuses, or accepts with a note (in this process: no interpreter start-up)
def main_cli(capsys, *args):
    """train_llama.main(args): (exit code, stdout, stderr)."""
    script = _script()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = script.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """Data files a user may hand the script by mistake."""
    tmp = tmp_path_factory.mktemp("odd")
    rows = [json.loads(line) for line in (ROOT / "examples" / "data" / "train.jsonl").read_text().splitlines()]
    user = {"role": "user", "content": "Write 35 in words."}
    long_row = {"messages": [{"role": "user", "content": "Write 35 in words. " * 2500},
                             {"role": "assistant", "content": "thirty-five"}]}
    files = {"long": rows[:2] + [long_row] + rows[2:200], "short": rows[:200],
             "empty_reply": [rows[0], {"messages": [user, {"role": "assistant", "content": ""}]}],
             "nul": [rows[0], {"messages": [{"role": "user", "content": "Write\u0000 35"},
                                            {"role": "assistant", "content": "thirty-five"}]}],
             "special": [rows[0], {"text": "<s></s>"}]}
    for name, content in files.items():
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in content))
    return tmp


REFUSED = {  # case -> (arguments, words of the one error line)
    "seq-len past the model's positions": (
        ["--seq-len", "1000000000"], ["--seq-len 1000000000 is more than the model's "
                                      "max_position_embeddings 512 (it has no positions past that); "
                                      "use --seq-len 512 or less"]),
    # the row that went to 23 GB before being killed for memory
    "a row past the model's positions": (
        ["--data", "{tmp}/long.jsonl", "--seq-len", "100000"],
        ["--seq-len 100000 is more than the model's max_position_embeddings 512",
         "--data {tmp}/long.jsonl:3 has a row of 250", "tokens, which the model cannot take at any --seq-len"]),
    "a row past --seq-len and the positions": (
        ["--data", "{tmp}/long.jsonl", "--seq-len", "512"],
        ["--data {tmp}/long.jsonl: 1 row(s) longer than --seq-len 512 tokens (the longest, line 3, has 250",
         "the model's max_position_embeddings is 512, so no --seq-len takes the rows longer than that"]),
    "every reply past --seq-len": (
        ["--data", "{tmp}/short.jsonl", "--seq-len", "8"],
        ["--data {tmp}/short.jsonl: 200 row(s) longer than --seq-len 8 tokens (the longest, line",
         "raise --seq-len to 2"]),
    "rank past every layer": (
        ["--r", "100000"], ["--r 100000 is more than the dimensions of every adapted layer (the "
                            "largest, model.layers.0.self_attn.q_proj, has 128 in, 128 out)",
                            "use --r 128 or less"]),
    "fsdp offload on one process": (
        ["--fsdp-cpu-offload"], ["--fsdp-cpu-offload moves FSDP's shards to host memory, and this "
                                 "is one process: start it with torchrun --nproc_per_node N"]),
    "paged budget without the paged optimizer": (
        ["--paged-device-budget", "1GB"], ["--paged-device-budget: only --optimizer paged_adamw8bit "
                                           "pages its states (this run uses --optimizer adamw)"]),
    "paged budget that is no size": (
        ["--optimizer", "paged_adamw8bit", "--paged-device-budget", "12xy"],
        ["argument --paged-device-budget: cannot read '12xy' as a memory size"]),
    "zero mlp tile": (["--mlp-tile-size", "0"], ["argument --mlp-tile-size: must be >= 1, got 0"]),
    "empty reply": (["--data", "{tmp}/empty_reply.jsonl"],
                    ["--data: {tmp}/empty_reply.jsonl:2: messages[1].content, an assistant reply, is empty"]),
    "NUL in a row": (["--data", "{tmp}/nul.jsonl"],
                     ["--data: {tmp}/nul.jsonl:2: messages[0].content holds a NUL character (\\u0000) "
                      "at offset 5"]),
    "special tokens only": (["--data", "{tmp}/special.jsonl"],
                            ["--data: {tmp}/special.jsonl:2: field 'text' holds only special tokens "
                             "('<s></s>')"]),
    "general text that is not there": (["--general", "{tmp}/nowhere.jsonl"],
                                       ["--general {tmp}/nowhere.jsonl: no such file"]),
}


# a 25,000-token row, once accepted, took 23 GB: these run in a process of at most 4 GiB
CAPPED = {"a row past the model's positions", "a row past --seq-len and the positions"}


def _at_most_4_gib():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_odd_input_is_one_line_naming_the_flag(case, odd_data, capsys, tmp_path):
    args, words = REFUSED[case]
    args = [*FAST, *(a.format(tmp=odd_data) for a in args), "--output", str(tmp_path / "out")]
    if case in CAPPED:
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
                              preexec_fn=_at_most_4_gib)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = main_cli(capsys, *args)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("train_llama.py: error: "), err
    for w in words:
        assert w.format(tmp=odd_data) in err
    assert "before: exact match" not in out  # refused before any evaluation or training


def test_more_than_the_data_has_is_a_note(capsys, tmp_path):
    # a micro-batch holds at most every example, and a step never spans two epochs: the run goes
    # on and says what it does instead
    code, out, err = main_cli(capsys, *FAST, "--max-steps", "1", "--batch-size", "100000",
                              "--grad-accum", "3", "--r", "100", "--general", "", "--output", tmp_path)
    assert code == 0, err
    assert "note: --batch-size 100000 is more than the 800 examples of --data: each micro-batch " \
           "holds all 800" in out
    assert "note: --grad-accum 3 is more than the 1 micro-batch(es) of an epoch (800 examples of " \
           "--data, --batch-size 800), and a step never spans two epochs: each step takes one " \
           "epoch, 1 micro-batch(es), so the run has 1 optimizer step(s)" in out
    assert "note: --r 100 is more than the dimensions of 8 of the 28 adapted layers (e.g. " \
           "model.layers.0.self_attn.k_proj: 128 in, 64 out); their updates have rank at most 64" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 1 and "forgetting" not in summary


def test_under_torchrun_a_usage_error_is_printed_by_rank_0_alone(capsys, monkeypatch):
    for rank, printed in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        code, _, err = main_cli(capsys, "--lr", "-1")
        assert code == 2 and bool(err) == printed, (rank, err)
    assert err == "train_llama.py: error: argument --lr: must be > 0, got -1\n"


def test_torchrun_prints_a_usage_error_once():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(SCRIPT), "--lr", "-1", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0  # torchrun's own code for a failed worker; the ranks exit with 2
    assert (proc.stdout + proc.stderr).count("train_llama.py: error: argument --lr") == 1
    assert "exitcode  : 2" in proc.stderr


# How `pip install -e` finds the package: a finder that Python asks after its path search. A
# folder named minift/ on the path (beside the script) has no __init__.py, so the path search
# makes it a namespace package, and that wins over the finder.
EDITABLE = """
import importlib.abc, importlib.util, os, runpy, sys
root, script = sys.argv[1], sys.argv[2]
sys.path[:] = [p for p in sys.path if p not in ('', root)
               and not os.path.isfile(os.path.join(p, 'minift', '__init__.py'))]
class Editable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == 'minift':
            return importlib.util.spec_from_file_location(
                name, os.path.join(root, 'minift', '__init__.py'),
                submodule_search_locations=[os.path.join(root, 'minift')])
sys.meta_path.append(Editable())
sys.path.insert(0, os.path.dirname(script))  # as `python script.py` does
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name='__main__')
"""


@pytest.mark.parametrize("name", ["train_llama.py", "train_dpo.py"])
def test_a_minift_folder_beside_the_script_is_named(tmp_path, name):
    (tmp_path / "minift").mkdir()  # a data folder, or a clone, beside a copy of the script
    for script in ("train_llama.py", "train_dpo.py"):
        shutil.copy(ROOT / "examples" / script, tmp_path / script)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK")}
    proc = subprocess.run([sys.executable, "-c", EDITABLE, str(ROOT), str(tmp_path / name), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr == (f"{name}: error: `import minift` found the folder {tmp_path / 'minift'}, "
                           f"not the minift package: a folder named minift on Python's path (beside "
                           f"the script, or in the current directory) takes its place; rename or "
                           f"move that folder, or run the script from another folder "
                           f"(docs/training.md, 'Where the script runs')\n")
    # without the folder the same launch finds the package
    (tmp_path / "minift").rmdir()
    proc = subprocess.run([sys.executable, "-c", EDITABLE, str(ROOT), str(tmp_path / name), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
