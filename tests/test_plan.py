"""The planner: memory strings, fits and recommendations, the CLI's output and errors."""
import json

import pytest

from minift.__main__ import main
from minift.memory.estimate import estimate_memory
from minift.models.config import ModelConfig
from minift.planning.plan import parse_memory, plan


@pytest.mark.parametrize("text, expected", [
    ("24GB", 24 * 10**9), ("24 GB", 24 * 10**9), ("24gB", 24 * 10**9), ("24GiB", 24 * 2**30),
    ("24kB", 24_000), ("24giB", 24 * 2**30),
    ("24G", 24 * 2**30), ("24000MB", 24 * 10**9), ("80 GiB", 80 * 2**30), ("1.5TB", 1.5e12),
    ("512MiB", 512 * 2**20),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["24", "24XB", "GB", "-3GB", "0GB", "24 G B", ""])
def test_parse_memory_rejects(text):
    with pytest.raises(ValueError, match="--gpu-memory: .*24GB"):
        parse_memory(text, "--gpu-memory")


@pytest.mark.parametrize("text, expected", [
    ("24Gb", 24 * 10**9), ("24gb", 24 * 10**9), ("24 Gib", 24 * 2**30), ("512mb", 512 * 10**6),
    ("8b", 8), ("24g", 24 * 2**30), ("1.5tb", 1.5e12),
])
def test_parse_memory_takes_units_in_any_case(text, expected):
    assert parse_memory(text, "--gpu-memory") == expected


def test_parse_memory_zero_only_when_allowed():
    assert parse_memory("0GB", "--reserve", allow_zero=True) == 0
    assert parse_memory("0 MiB", "--reserve", allow_zero=True) == 0
    with pytest.raises(ValueError, match="--reserve: '0GB' must be a positive memory size"):
        parse_memory("0GB", "--reserve")
    with pytest.raises(ValueError, match="--reserve: cannot read '-1GB'"):
        parse_memory("-1GB", "--reserve", allow_zero=True)


def test_cli_plan_reserve_zero_leaves_all_memory_usable(capsys):
    assert main(["plan", "--model", "llama-2-7b", "--gpu-memory", "24GiB", "--seq-len", "512",
                 "--reserve", "0GB"]) == 0
    out = capsys.readouterr().out
    assert "minus a reserve of 0 B for the CUDA context: 24.00 GiB usable" in out


def test_cli_plan_small_model_in_mib(capsys):
    assert main(["plan", "--model", "tiny", "--gpu-memory", "2GB", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    est = estimate_memory("tiny", "full", 1, 64)
    assert f"| total | {est.total / 2**20:.2f} MiB |" in out
    assert "0.00 GiB" not in out
    usable = (2 * 10**9 - 2**30) / 2**20  # 2GB minus the default 1 GiB reserve
    assert f"({est.total / 2**20:.2f} MiB of {usable:.2f} MiB)" in out


def test_plan_rejects_seq_len_beyond_the_model():
    cfg = ModelConfig.from_name("llama-2-7b")
    with pytest.raises(ValueError, match=r"seq_len 4097 is longer than the model's "
                                         r"max_position_embeddings \(4096\)"):
        plan(cfg, parse_memory("80GB"), seq_len=4097)
    assert plan(cfg, parse_memory("80GB"), seq_len=4096)["methods"]["qlora"]["fits"]


def test_plan_fits_and_largest_batch_agree_with_the_estimator():
    cfg = ModelConfig.from_name("llama-3-8b")
    res = plan(cfg, parse_memory("24GB"), batch_size=1, seq_len=512, reserve=2**30)
    m = res["methods"]
    assert [m[k]["fits"] for k in ("full", "lora", "qlora")] == [False, True, True]
    # full does not fit as asked, but does with the memory features: the best that fits either way
    assert res["features"]["full"]["fits"] and res["recommendation"] == "full"
    b = m["qlora"]["max_batch_size"]
    budget = res["budget"]
    assert estimate_memory(cfg, "qlora", b, 512).total <= budget < estimate_memory(cfg, "qlora", b + 1, 512).total
    t = m["lora"]["max_seq_len"]
    assert estimate_memory(cfg, "lora", 1, t).total <= budget < estimate_memory(cfg, "lora", 1, t + 1).total


def test_cli_plan_prints_side_by_side(capsys):
    assert main(["plan", "--model", "llama-2-7b", "--gpu-memory", "40GB", "--seq-len", "512",
                 "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "| category | full | LoRA | QLoRA |" in out
    assert "| fits | no | yes | yes |" in out
    assert "Recommendation: full — the highest-quality method that fits batch 4 x seq 512, with " in out
    assert "TrainConfig(method='full', optimizer='paged_adamw8bit', gradient_checkpointing=True" in out
    assert "Without memory features LoRA fits as asked" in out
    assert "largest batch at seq 512" in out and "longest seq at batch 4" in out


def test_cli_plan_nothing_fits(capsys):
    assert main(["plan", "--model", "llama-3-70b", "--gpu-memory", "16GiB"]) == 0
    assert "nothing fits even at batch 1" in capsys.readouterr().out


def test_cli_plan_reads_a_config_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(ModelConfig.from_name("tiny").to_hf_dict()))
    assert main(["plan", "--model", str(tmp_path), "--gpu-memory", "2GB", "--seq-len", "64"]) == 0
    assert "Recommendation: full" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["--gpu-memory", "24 parsecs"], "--gpu-memory: cannot read '24 parsecs'"),
    (["--gpu-memory", "24"], "--gpu-memory: '24' has no unit"),
    (["--model", "llama-9"], "unknown model preset 'llama-9'; known presets:"),
    (["--model", "./missing_dir"], "no config.json at"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--seq-len", "-1"], "--seq-len must be a positive integer, got -1"),
    (["--reserve", "30GB"], "--reserve .* leaves nothing"),
    (["--gpu-memory", "24Gbit"], "--gpu-memory: cannot read '24Gbit'"),
    (["--seq-len", "8193"], r"--seq-len 8193 is longer than llama-3-8b's "
                            r"max_position_embeddings \(8192\)"),
])
def test_cli_plan_errors(argv, match, capsys):
    args = {"--model": "llama-3-8b", "--gpu-memory": "24GB"}
    it = iter(argv)
    args.update(dict(zip(it, it)))
    flat = [x for kv in args.items() for x in kv]
    with pytest.raises(SystemExit) as exc:
        main(["plan"] + flat)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("minift plan: error:")
    import re
    assert re.search(match, err)


def test_cli_bench_rejects_bad_paths(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", str(tmp_path), "--no-chart"])
    assert exc.value.code == 2
    assert "--model: no config.json in" in capsys.readouterr().err


def test_cli_plan_turns_features_on_and_reports_host_and_longest(capsys):
    # Llama-3.1-8B, batch 2 x 2048 in 24 GiB: full fine-tuning needs every feature; the host RAM
    # it needs is the paged 8-bit states plus the offloaded layer inputs
    assert main(["plan", "--model", "llama-3.1-8b", "--gpu-memory", "24GiB", "--batch-size", "2",
                 "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    full = next(line for line in out.splitlines() if line.startswith("- full: fits with"))
    assert "optimizer step in backward" in full and "activation offload" in full
    assert "host RAM 16.19 GiB" in full
    qlora = next(line for line in out.splitlines() if line.startswith("- qlora:"))
    longest = int(qlora.split("with every feature: ")[1].split()[0])
    assert longest >= 80_000


# ---- advice a user can act on -------------------------------------------------------------
def _gib(n):
    from minift.planning.plan import fmt_auto
    return fmt_auto(n)


def test_plan_says_when_a_method_fits_only_with_gradient_checkpointing(capsys):
    assert main(["plan", "--model", "llama-2-7b", "--gpu-memory", "24gb", "--seq-len", "2048",
                 "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    budget = 24 * 10**9 - 2**30
    lora = estimate_memory("llama-2-7b", "lora", 2, 2048, gradient_checkpointing=True)
    assert estimate_memory("llama-2-7b", "lora", 2, 2048).total > budget >= lora.total
    assert f"LoRA fits only with --gradient-checkpointing ({_gib(lora.total)} of {_gib(budget)})." in out


def test_plan_shows_the_host_ram_of_paged_states(capsys):
    assert main(["plan", "--model", "llama-2-7b", "--gpu-memory", "80GB", "--seq-len", "512",
                 "--optimizer", "paged_adamw8bit"]) == 0
    out = capsys.readouterr().out
    full = estimate_memory("llama-2-7b", "full", 1, 512, optimizer="adamw8bit").optimizer_states
    assert full > 10 * 2**30
    assert (f"paged_adamw8bit keeps the optimizer states in host RAM, not on the GPU: full "
            f"{_gib(full)}, LoRA ") in out


def test_plan_says_what_would_fit_when_nothing_does():
    from minift.planning.plan import plan as run_plan
    res = run_plan(ModelConfig.from_name("llama-3-70b"), 16 * 2**30)
    assert res["recommendation"] is None
    line = next(a for a in res["advice"] if a.startswith("QLoRA would fit on "))
    n = int(line.split()[4])
    e = estimate_memory("llama-3-70b", "qlora", 1, 2048, gradient_checkpointing=True)
    states = e.frozen_weights + e.trainable_params + e.gradients + e.optimizer_states
    budget = res["budget"]
    assert states / n + (e.total - states) <= budget < states / (n - 1) + (e.total - states)
    # a model whose QLoRA base fits: a shorter sequence is offered, with a length that fits
    res = run_plan(ModelConfig.from_name("llama-2-7b"), 6 * 10**9, seq_len=4096, reserve=0)
    line = next(a for a in res["advice"] if "--seq-len" in a)
    t = int(line.split("--seq-len ")[1].split()[0])
    assert estimate_memory("llama-2-7b", "qlora", 1, t, gradient_checkpointing=True).total <= 6e9
    assert estimate_memory("llama-2-7b", "qlora", 1, t + 1, gradient_checkpointing=True).total > 6e9



# ---- the planner does not contradict itself ------------------------------------------------
def _plan_text(capsys, *args):
    assert main(["plan", *args]) == 0
    return capsys.readouterr().out


def test_the_recommendation_agrees_with_the_feature_lines(capsys):
    # llama-3.1-8b on 24GB recommended QLoRA while printing "full: fits with ... 17.02 GiB"
    out = _plan_text(capsys, "--model", "llama-3.1-8b", "--gpu-memory", "24GB")
    assert "- full: fits with " in out
    assert "Recommendation: full — " in out and "Without memory features QLoRA fits as asked" in out


def test_a_small_model_is_not_said_to_fit_nowhere(capsys):
    # a 0.5B model on 8GB said "nothing fits" beside feature lines where all three fit with the
    # loss chunk TrainConfig uses by default
    out = _plan_text(capsys, "--model", "qwen2.5-0.5b", "--gpu-memory", "8GB")
    assert "nothing fits" not in out
    assert "- qlora: fits with gradient checkpointing (loss_chunk_size=1024)" in out
    assert "Recommendation: full — " in out and "TrainConfig(method='full', gradient_checkpointing=True)" in out


def test_given_gradient_checkpointing_is_not_advised_again(capsys):
    out = _plan_text(capsys, "--model", "llama-2-70b", "--gpu-memory", "24GB", "--gradient-checkpointing")
    assert "would fit on" in out  # the ways out are still given ...
    assert "--gradient-checkpointing" not in out.split("Recommendation:")[1]  # ... without the flag
    assert "gradient checkpointing on | loss chunk 1024" in out


def test_a_dpo_plan_counts_dpo_in_the_feature_lines_too(capsys):
    # the feature lines printed SFT numbers and left out full fine-tuning's frozen reference
    cfg = ModelConfig.from_name("llama-3.1-8b")
    sft = plan(cfg, parse_memory("24GB"))
    dpo = plan(cfg, parse_memory("24GB"), objective="dpo")
    for m in ("full", "lora", "qlora"):
        est, settings = dpo["features"][m]["estimate"], dpo["features"][m]["settings"]
        assert est.settings["objective"] == "dpo" and est.settings["pairs"] == 1
        assert est.total > estimate_memory(cfg, m, 1, 2048, attention_mask=False, **settings).total
    assert sft["features"]["full"]["estimate"].settings.get("objective") is None
    full = dpo["features"]["full"]["estimate"]
    assert full.terms["reference_weights"] > 0 and full.settings["objective"] == "dpo"


def test_the_loss_chunk_is_a_flag_with_trainconfigs_default(capsys):
    from minift.training.config import TrainConfig
    cfg = ModelConfig.from_name("llama-3.1-8b")
    chunked = plan(cfg, parse_memory("80GB"), gradient_checkpointing=True)
    assert chunked["loss_chunk_size"] == TrainConfig().loss_chunk_size == 1024
    full_logits = plan(cfg, parse_memory("80GB"), gradient_checkpointing=True, loss_chunk_size=None)
    assert full_logits["methods"]["qlora"]["estimate"].total > chunked["methods"]["qlora"]["estimate"].total
    out = _plan_text(capsys, "--model", "llama-3.1-8b", "--gpu-memory", "80GB", "--gradient-checkpointing",
                     "--loss-chunk-size", "0")
    assert "loss chunk off (full logits)" in out
