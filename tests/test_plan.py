"""The planner: memory strings, fits and recommendations, the CLI's output and errors."""
import json

import pytest

from minift.__main__ import main
from minift.estimate import estimate_memory
from minift.plan import parse_memory, plan
from minift.config import ModelConfig


@pytest.mark.parametrize("text, expected", [
    ("24GB", 24 * 10**9), ("24 GB", 24 * 10**9), ("24gb", 24 * 10**9), ("24GiB", 24 * 2**30),
    ("24G", 24 * 2**30), ("24000MB", 24 * 10**9), ("80 GiB", 80 * 2**30), ("1.5TB", 1.5e12),
    ("512MiB", 512 * 2**20),
])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["24", "24XB", "GB", "-3GB", "0GB", "24 G B", ""])
def test_parse_memory_rejects(text):
    with pytest.raises(ValueError, match="--gpu-memory: .*24GB"):
        parse_memory(text, "--gpu-memory")


def test_plan_fits_and_largest_batch_agree_with_the_estimator():
    cfg = ModelConfig.from_name("llama-3-8b")
    res = plan(cfg, parse_memory("24GB"), batch_size=1, seq_len=512, reserve=2**30)
    m = res["methods"]
    assert [m[k]["fits"] for k in ("full", "lora", "qlora")] == [False, True, True]
    assert res["recommendation"] == "lora"
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
    assert "Recommendation: LoRA" in out
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
