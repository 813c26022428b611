"""`python -m minift bench gpu`: the whole suite in its CPU dry run, its guards, its CLI."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

import minift.bench.gpu as bench_gpu
from minift.__main__ import main
from minift.bench.gpu_steps import STEP_METHODS, train_flops_per_token
from minift.models.config import ModelConfig

PARTS = list(bench_gpu.PART_NAMES)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert record["arguments"]["dry_run"] is True and record["arguments"]["budget_s"] == 540.0
    results = record["results"]
    assert list(results) == PARTS and set(record["plan"]["parts"]) == set(PARTS)
    assert not [name for name, r in results.items() if "skipped" in r]
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
    copy = r["copy_bandwidth"]["bytes_per_s"]
    for row in (v for k, v in r["nf4_dequant"].items() if k != "wall_s"):
        assert row["loop_ms"] and row["cold_ms"] and row["loop_calls"] == 2
        for kind in ("loop", "cold"):
            assert row[f"share_of_copy_{kind}"] == pytest.approx(
                row["bytes"] / (statistics.median(row[f"{kind}_ms"]) / 1e3) / copy)
    # fp32 parameter read + written, the gradient read twice (non-finite check, step), 8-bit states
    assert r["adamw8bit"]["adamw8bit"]["floor_bytes"] == 4096 * (4 + 4 + 4 + 4 + 2 + 2)
    assert r["adamw8bit"]["torch_adamw_fused"]["cold_ms"]
    lora = r["adamw8bit"]["adamw8bit_lora_r16"]  # tiny preset: 2 layers x 7 linears x (A, B)
    assert lora["tensors"] == 28 and lora["loop_ms"] and lora["cold_ms"]
    launches = r["adamw8bit"]["lora_launches"]  # 14 factors of one layer at rank 4 in the dry run
    h, kv, inter = 64, 16, 128  # the dry run's widths; A factors (4, in), B factors (out, 4)
    assert launches["tensors"] == 14 and launches["numel"] == (6 * h + inter) * 4 + (h + kv + kv + h + inter + inter + h) * 4
    assert launches["one_launch_ms"] and launches["per_tensor_launches_ms"] and launches["optimizer_step_ms"]
    for op in ("rmsnorm", "rope", "swiglu"):
        row = r["fused_ops"][op]
        assert row["eager"]["loop_ms"] and row["compiled"]["cold_ms"] and "not on this device" in row["fused"]
    steps = r["train_steps"]
    for method, optimizer in STEP_METHODS:
        row = steps[method]
        assert row["optimizer"] == optimizer and row["ms"] and row["tokens_per_s"] > 0
        assert row["estimate"]["total"] > 0 and row["mfu"] > 0
    peer = r["peer_steps"]
    assert peer["lora"]["ms"] and peer["full"]["ms"]
    assert "skipped" in peer["qlora"]  # bitsandbytes NF4 needs CUDA
    assert peer["process"]["cwd"] != os.getcwd()


@pytest.mark.slow  # the whole suite once (module fixture)
def test_dry_run_attention_and_feature_steps(dry_run):
    r = dry_run[1]["results"]
    att = r["attention"]
    assert att["causal"]["mask_kind"] == "NoneType" and att["causal"]["backward"]
    for name in ("padded", "packed"):  # flex's block mask and the dense mask; no flex backward on CPU
        assert att[f"{name}_flex"]["mask_kind"] == "BlockMask" and att[f"{name}_flex"]["ms"]
        assert att[f"{name}_dense"]["mask_kind"] == "Tensor" and att[f"{name}_dense"]["backward"]
    f = r["feature_steps"]
    assert f["qlora_offload"]["train_config"]["activation_offload"] is True
    assert f["full_paged"]["train_config"]["optimizer"] == "paged_adamw8bit"
    assert f["lora_compiled"]["train_config"]["compile"] is True
    for name in ("qlora_offload", "full_paged", "lora_eager", "lora_compiled"):
        assert "error" not in f[name] and f[name]["ms"] and f[name]["estimate"]["total"] > 0, name
    # the compiled layers compute the eager step's loss (same seed, same batch)
    assert f["lora_compiled"]["first_loss"] == pytest.approx(f["lora_eager"]["first_loss"], rel=1e-3)
    assert "not traced" in f["lora_compiled"]["estimate_note"] and f["compiled_speedup"] > 0


@pytest.mark.slow  # a child interpreter imports transformers and peft (~15-20 s here)
def test_peers_run_from_the_repository_root_without_its_kernels_folder(tmp_path):
    """Run from the root (and with the root on PYTHONPATH), ``import kernels`` in the suite's own
    process finds minift's folder; the peer process must not."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "minift", "bench", "gpu", "--dry-run", "--only", "peer_steps",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    peer = json.loads((tmp_path / "bench_gpu.json").read_text())["results"]["peer_steps"]
    assert peer["lora"]["ms"] and peer["full"]["ms"], peer
    where = peer["process"]
    assert os.path.realpath(ROOT) in where["removed_from_sys_path"]
    assert where["kernels_module"] is None or not where["kernels_module"].startswith(os.path.realpath(ROOT))


def _parts(monkeypatch, *parts):
    monkeypatch.setattr(bench_gpu, "PARTS", tuple(parts))


def test_a_failing_part_is_recorded_and_the_suite_goes_on(monkeypatch):
    def out_of_memory(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _parts(monkeypatch, bench_gpu.Part("copy_bandwidth", out_of_memory, 5, 0), bench_gpu.PARTS[1])
    results = bench_gpu.run_suite(torch.device("cpu"), True, 60.0)
    assert results["copy_bandwidth"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert results["matmul_flops"]["flops_per_s"] > 0


def test_a_spent_budget_skips_the_remaining_parts():
    results = bench_gpu.run_suite(torch.device("cpu"), True, 1e-9, only=["copy_bandwidth"])
    assert "run it with --only copy_bandwidth" in results["copy_bandwidth"]["skipped"]


def test_the_plan_counts_setup_and_names_what_does_not_fit():
    parts = [bench_gpu.Part(n, None, 10, 20) for n in ("a", "b", "c")]
    assert bench_gpu.plan(parts, 100, dry_run=False) == (1.0, {"a": 30, "b": 30, "c": 30})
    scale, planned = bench_gpu.plan(parts, 70, dry_run=False)  # 60 s of setup leave 10 of 30 s
    assert scale == 0.5 and planned["a"] == planned["b"] == 25  # timings halve, no further
    assert planned["c"] == ("does not fit: needs ~25 s (setup ~20 s), 20 s of --budget-s left; "
                            "run it with --only c")
    scale, planned = bench_gpu.plan(parts, 2, dry_run=True)  # the dry run counts no setup
    assert planned == {"a": 0.2, "b": 0.2, "c": 0.2}
    # the GPU default: every part's setup and at least half its seconds fit into two calls
    gpu = sum(p.setup_s + p.seconds * bench_gpu.MIN_SCALE for p in bench_gpu.PARTS)
    assert bench_gpu.DEFAULT_BUDGET_S < 600 and gpu < 2 * bench_gpu.DEFAULT_BUDGET_S


def test_the_json_is_on_disk_after_every_part(monkeypatch, tmp_path):
    path = str(tmp_path / "bench_gpu.json")
    seen = []

    def first(ctx):
        return {"value": 1}

    def second(ctx):
        seen.append(json.loads(open(path).read())["results"])
        return {"value": 2}

    _parts(monkeypatch, bench_gpu.Part("first", first, 1, 0), bench_gpu.Part("second", second, 1, 0))
    record = bench_gpu.Record(path, {"results": {}, "started": 0.0})
    bench_gpu.run_suite(torch.device("cpu"), True, 60.0, record=record)
    assert seen[0]["first"]["value"] == 1 and "second" not in seen[0]
    final = json.loads(open(path).read())
    assert final["results"]["second"]["value"] == 2 and set(final["plan"]["parts"]) == {"first", "second"}


HANGING = """
import sys, time
import minift.bench.gpu as g
from minift.__main__ import main
def hang(ctx):
    time.sleep(120)
g.PARTS = (g.Part("copy_bandwidth", hang, 0.1, 0), g.PARTS[1])
g.HANG_MARGIN_S = 1.0
main(["bench", "gpu", "--dry-run", "--out", sys.argv[1]])
"""


def test_a_hung_part_is_recorded_and_the_process_ends(tmp_path):
    proc = subprocess.run([sys.executable, "-c", HANGING, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "part copy_bandwidth: hung after" in proc.stdout
    record = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert record["stopped_by_watchdog"] == "copy_bandwidth"
    error = record["results"]["copy_bandwidth"]["error"]
    assert error.startswith("hung: still running after 1 s") and "--only matmul_flops" in error


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
