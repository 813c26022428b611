"""`python -m minift bench gpu`: the whole suite in its CPU dry run, its guards, its CLI."""
import json
import statistics

import pytest
import torch

import minift.bench.gpu as bench_gpu
from minift.__main__ import main
from minift.bench.gpu_steps import STEP_METHODS, train_flops_per_token
from minift.models.config import ModelConfig

PARTS = [name for name, _ in bench_gpu.PARTS]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu")
    code = main(["bench", "gpu", "--dry-run", "--out", str(out)])
    return code, json.loads((out / "bench_gpu.json").read_text())


@pytest.mark.slow  # the whole suite once (module fixture): ~10-30 s on 2 shared cores
def test_dry_run_runs_every_part(dry_run):
    code, record = dry_run
    assert code == 0 and record["dry_run"] is True
    assert {"command", "machine", "versions", "git_commit", "device", "sizes", "results"} <= set(record)
    assert record["versions"]["torch"] == torch.__version__ and record["device"]["type"] == "cpu"
    assert record["arguments"]["dry_run"] is True and record["arguments"]["budget_s"] == 480.0
    results = record["results"]
    assert list(results) == PARTS
    assert not [name for name, r in results.items() if "error" in r]
    assert results["copy_bandwidth"]["bytes_per_s"] > 0 and results["matmul_flops"]["flops_per_s"] > 0


@pytest.mark.slow  # the whole suite once (module fixture): ~10-30 s on 2 shared cores
def test_dry_run_checks_the_kernels(dry_run):
    checks = dry_run[1]["results"]["kernel_checks"]  # the interpreter runs them (conftest)
    kernels = ("nf4_dequant", "adamw8bit_float32", "adamw8bit_bfloat16", "adamw8bit_many")
    assert set(kernels) <= set(checks)
    assert all(checks[k]["equal"] for k in kernels)
    assert checks["adamw8bit_many"]["launches"] == 3  # bf16 stochastic, fp32, bf16: three groups
    # fused RMSNorm / RoPE / SwiGLU in bf16: within a few bf16 roundings of the reference
    assert set(checks["fused"]) == {"rmsnorm", "rope", "swiglu"}
    for op in checks["fused"].values():
        assert op["forward_max_abs_diff"] <= 0.0625 and op["grad_max_abs_diff"] <= 0.0625


@pytest.mark.slow  # the whole suite once (module fixture): ~10-30 s on 2 shared cores
def test_dry_run_timings_and_ratios(dry_run):
    r = dry_run[1]["results"]
    assert set(r["nf4_dequant"]) - {"wall_s"} == {"64x64", "64x192", "128x256"}
    for row in (v for k, v in r["nf4_dequant"].items() if k != "wall_s"):
        assert row["ms"] and row["share_of_copy"] == pytest.approx(
            row["bytes"] / (statistics.median(row["ms"]) / 1e3)
            / r["copy_bandwidth"]["bytes_per_s"])
    assert r["adamw8bit"]["adamw8bit"]["floor_bytes"] == 4096 * 16
    assert r["adamw8bit"]["torch_adamw_fused"]["ms"]
    lora = r["adamw8bit"]["lora_step"]  # 14 factors of one layer at rank 4 in the dry run
    h, kv, inter = 64, 16, 128  # the dry run's widths; A factors (4, in), B factors (out, 4)
    assert lora["tensors"] == 14 and lora["numel"] == (6 * h + inter) * 4 + (h + kv + kv + h + inter + inter + h) * 4
    assert lora["one_launch_ms"] and lora["per_tensor_launches_ms"] and lora["optimizer_step_ms"]
    for op in ("rmsnorm", "rope", "swiglu"):
        assert r["fused_ops"][op]["eager_ms"] and "not on this device" in r["fused_ops"][op]["fused_ms"]
    steps = r["train_steps"]
    for method, optimizer in STEP_METHODS:
        row = steps[method]
        assert row["optimizer"] == optimizer and row["ms"] and row["tokens_per_s"] > 0
        assert row["estimate"]["total"] > 0 and row["mfu"] > 0
    peer = r["peer_steps"]
    assert peer["lora"]["ms"] and peer["full"]["ms"]
    assert "skipped" in peer["qlora"]  # bitsandbytes NF4 needs CUDA


def test_a_failing_part_is_recorded_and_the_suite_goes_on(monkeypatch):
    def out_of_memory(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    parts = list(bench_gpu.PARTS)
    parts[0] = ("copy_bandwidth", out_of_memory)
    monkeypatch.setattr(bench_gpu, "PARTS", tuple(parts))
    results = bench_gpu.run_suite(torch.device("cpu"), True, 60.0,
                                  only=["copy_bandwidth", "matmul_flops"])
    assert results["copy_bandwidth"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert results["matmul_flops"]["flops_per_s"] > 0


def test_a_spent_budget_skips_the_remaining_parts():
    results = bench_gpu.run_suite(torch.device("cpu"), True, 1e-9, only=["copy_bandwidth"])
    assert results["copy_bandwidth"]["skipped"] == "the suite's time budget is spent"


def test_flops_per_token_of_llama_31_8b():
    config = ModelConfig.from_name("llama-3.1-8b")
    assert config.num_parameters() == 8_030_261_248  # the published parameter count
    assert config.rope_scaling["factor"] == 8.0 and config.max_position_embeddings == 131072
    matmul = 8_030_261_248 - 2 * 128256 * 4096 - 65 * 4096 + 128256 * 4096  # no embedding, norms
    attention = 12 * 32 * 2048 * 4096
    assert train_flops_per_token(config, 2048, "full") == 6 * matmul + attention
    assert train_flops_per_token(config, 2048, "lora") == 4 * matmul + attention


def test_bench_gpu_bad_input(capsys, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as e:
            main(["bench", "gpu", "--out", str(tmp_path)])
        assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "gpu", "--dry-run", "--out", str(tmp_path), "--budget-s", "nan"])
    assert "--budget-s must be a finite number > 0, got nan" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "gpu", "--dry-run"])  # --out is required
    assert "--out" in capsys.readouterr().err


@pytest.mark.slow  # the whole suite once (module fixture): ~10-30 s on 2 shared cores
def test_dry_run_fsdp_part(dry_run):
    """FSDP on a 1-process group (gloo in the dry run): the NF4 gather is bit-exact and 4-bit,
    the FSDP step's loss is the plain step's, and the launch variables are put back."""
    import os
    r = dry_run[1]["results"]["fsdp"]
    gather = r["nf4_gather"]
    assert gather["equal"] and gather["gathered_bytes"] < gather["bf16_bytes"] / 3
    assert r["fsdp"]["first_loss"] == pytest.approx(r["plain"]["first_loss"], rel=1e-5)
    assert r["fsdp"]["ms"] and r["plain"]["ms"]
    # the estimate of the plain step: the same bytes as it, bar what FSDP gathers
    assert r["estimate"]["total"] > 0 and r["estimate"]["host"] == 0
    # the suite ran in this process: its group is gone and no launch variable is left behind
    assert not torch.distributed.is_initialized()
    assert not {"MASTER_PORT", "RANK", "WORLD_SIZE"} & set(os.environ)
