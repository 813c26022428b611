"""The planner: memory strings, the cheapest setting that fits each method (traced), the CLI's
output, --json, --search and its errors. Small models keep the traces fast."""
import json

import pytest

from minift import TrainConfig
from minift.__main__ import main
from minift.planning.estimate import estimate_memory
from minift.planning.plan import LADDER, Request, climb, largest, parse_memory, plan, search

MIB = 2**20
# a small model with a real-sized head: the ladder's rungs each change its trace
SMALL = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)


@pytest.fixture
def small(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(SMALL, model_type="llama")))
    return str(tmp_path)


def _small():
    from minift.models.config import ModelConfig
    return ModelConfig(**SMALL)


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


def _json(capsys, *argv):
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_defaults_are_trainconfigs():
    import argparse

    from minift.planning.plan import add_plan_arguments
    parser = argparse.ArgumentParser()
    add_plan_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--gpu-memory", "1GB"])
    default = TrainConfig()
    assert args.optimizer == default.optimizer and args.loss_chunk_size == default.loss_chunk_size
    assert args.mlp_tile_size == default.mlp_tile_size and args.grad_accum == default.grad_accum
    assert args.gradient_checkpointing == default.gradient_checkpointing
    assert args.activation_offload == default.activation_offload
    assert args.optimizer_in_backward == default.optimizer_in_backward
    assert args.objective == default.objective


def test_every_method_as_asked_is_the_traced_estimate(capsys):
    out = _json(capsys, "--model", "tiny", "--gpu-memory", "2GiB", "--seq-len", "64", "--reserve", "0GB")
    for method in ("full", "lora", "qlora"):
        est = estimate_memory("tiny", method, 1, 64, attention_mask=False)
        entry = out["methods"][method]
        assert entry["asked"]["total"] == est.total and entry["asked"]["reserved"] == est.reserved
        assert entry["fits"] and entry["features"] == []  # a tiny model fits 2 GiB as asked
        config = eval(entry["train_config"].split("  with ")[0], {"TrainConfig": TrainConfig})
        assert config.method == method
    assert out["recommendation"] == "full"


def test_a_method_that_does_not_fit_climbs_the_ladder_until_it_fits():
    request = Request(batch_size=2, seq_len=256)
    asked = request.estimate(_small(), "qlora")
    budget = asked.total - 1  # as asked it misses by one byte
    res = climb(_small(), request, "qlora", budget)
    assert res["asked"].total == asked.total > budget
    assert res["fits"] and res["estimate"].total <= budget
    assert res["features"] and res["features"][0] == LADDER[0].name  # the cheapest rung first
    # the setting it prints is the one it traced
    again = request.estimate(_small(), "qlora", res["fields"], res["prep"])
    assert again.total == res["estimate"].total


def test_nothing_fits_says_so_and_names_the_weights(capsys, small):
    assert main(["plan", "--model", small, "--gpu-memory", "12MB", "--seq-len", "128",
                 "--reserve", "0GB"]) == 0
    out = capsys.readouterr().out
    assert "full does not fit even with every feature" in out
    assert "Recommendation:" in out


def test_the_printed_command_and_config_run_the_traced_setting(capsys, small):
    out = _json(capsys, "--model", small, "--gpu-memory", "40MB", "--seq-len", "256",
                "--batch-size", "2", "--reserve", "0GB")
    lora = out["methods"]["lora"]
    assert lora["command"].startswith("python examples/train_llama.py --method lora --batch-size 2 --seq-len 256")
    if lora["features"]:
        assert "--gradient-checkpointing" in lora["command"]
        assert "gradient_checkpointing=True" in lora["train_config"]
    assert lora["estimate"]["total"] <= out["budget"] or not lora["fits"]


def test_search_brackets_the_longest_sequence_with_traces():
    cfg = _small()
    request = Request(batch_size=1, seq_len=64)
    budget = request.estimate(cfg, "lora", seq_len=1024).total  # 1024 tokens fit exactly
    found = search(cfg, request, "lora", budget, {}, {}, seq_step=256, max_seq=4096)
    assert found["longest_seq_batch_1"] >= 1024 and found["longest_seq_batch_1"] % 256 == 0
    longest = found["longest_seq_batch_1"]
    assert request.estimate(cfg, "lora", seq_len=longest, batch_size=1).total <= budget
    if longest + 256 <= 4096:
        assert request.estimate(cfg, "lora", seq_len=longest + 256, batch_size=1).total > budget
    assert found["largest_batch"] >= 1


def test_largest_finds_the_boundary():
    calls = []

    def fits(n):
        calls.append(n)
        return n <= 777
    assert largest(fits, 1, 10_000) == 777
    assert len(calls) < 40
    assert largest(lambda n: False, 1, 100) == 0
    assert largest(lambda n: n <= 5000, 256, 100_000, 256) == 4864


def test_plan_function_recommends_the_best_method_that_fits():
    from minift.models.config import ModelConfig
    cfg = ModelConfig.from_name("tiny")
    result = plan(cfg, 2 * 2**30, Request(seq_len=64), reserve=0)
    assert result["recommendation"] == "full"
    full = result["methods"]["full"]["estimate"].total
    tight = plan(cfg, full - 1, Request(seq_len=64), reserve=0)
    assert tight["methods"]["full"]["asked"].total > tight["budget"]


@pytest.mark.parametrize("argv, message", [
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--gpu-memory", "1GB", "--seq-len", "99999"], "max_position_embeddings"),
    (["--gpu-memory", "1GB", "--activation-offload"], "gradient_checkpointing"),
    (["--gpu-memory", "1GB", "--cpu-offload"], "unrecognized arguments"),
    (["--gpu-memory", "1GB", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--gpu-memory", "1GB", "--loss-chunk-size", "-1"], "--loss-chunk-size"),
    (["--gpu-memory", "1GB", "--seq-len", "64", "--reserve", "2GB"], "--reserve"),
    (["--gpu-memory", "1GB", "--paged-device-budget", "some"], "--paged-device-budget"),
    (["--gpu-memory", "1GB", "--grpo-group-size", "8"], "apply to --objective grpo"),
    (["--gpu-memory", "1GB", "--objective", "grpo", "--gpus", "2"], "plan one GPU"),
    (["--gpu-memory", "1GB", "--objective", "grpo", "--grpo-group-size", "1"], "grpo_group_size"),
])
def test_bad_flags_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--model", "tiny", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(message in line for line in err), err
    assert not any("Traceback" in line for line in err)


def test_text_report_names_the_peak_and_the_budget(capsys):
    assert main(["plan", "--model", "tiny", "--gpu-memory", "1GiB", "--seq-len", "64", "--reserve", "0GB"]) == 0
    out = capsys.readouterr().out
    assert "1.00 GiB usable" in out and "peak at " in out and "| reserved |" in out
    assert "TrainConfig(method='full'" in out and "python examples/train_llama.py --method full" in out


def test_fsdp_plan_is_per_gpu(capsys):
    one = _json(capsys, "--model", "tiny", "--gpu-memory", "2GiB", "--seq-len", "64")
    two = _json(capsys, "--model", "tiny", "--gpu-memory", "2GiB", "--seq-len", "64", "--gpus", "2")
    assert two["methods"]["full"]["asked"]["trainable_params"] < one["methods"]["full"]["asked"]["trainable_params"]
    assert two["methods"]["full"]["command"].startswith("torchrun --nproc_per_node 2 ")


def test_a_grpo_plan_traces_the_largest_stage(capsys):
    out = _json(capsys, "--model", "tiny", "--gpu-memory", "2GiB", "--seq-len", "32", "--reserve", "0GB",
                "--objective", "grpo", "--grpo-group-size", "4", "--grpo-max-new-tokens", "16")
    for method in ("lora", "qlora"):
        entry = out["methods"][method]
        est = estimate_memory("tiny", method, 1, 32, attention_mask=False, objective="grpo",
                              grpo_group_size=4, grpo_max_new_tokens=16)
        assert entry["asked"]["total"] == est.total
        assert entry["asked"]["moment"].split(":")[0] in ("rollout", "scoring", "update")
        assert "objective='grpo'" in entry["train_config"] and entry["command"].startswith("minift.train(")
