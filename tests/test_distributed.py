"""Two-process gloo runs of minift/distributed/parallel.py, minift/nf4/fsdp.py, minift/distributed/checkpoint.py and
minift/distributed/run.py, against 1-process runs of the same code in this process.

One spawn of 2 CPU processes (the `runs` fixture) runs every case of tests/dist_cases.py; the
one-process pieces at the end need no process group.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_cases import (
    CASES,
    LOSS_RTOL,
    OPTIM8_CASES,
    THREE,
    THREE_CASES,
    TRAIN_CASES,
    WORLD,
    aligned_model,
    case_name,
    examples,
    free_port,
    loss_sum,
    make_model,
    optim8_name,
    optim8_run,
    prepared,
    run_alone,
    run_case,
    run_steps,
    step_config,
    train_config,
    worker,
    worker3,
)
from safetensors.torch import load_file
from torch import nn

import minift
from minift.checkpoints import steps as ckpt
from minift.distributed import checkpoint as dckpt
from minift.distributed import parallel as mdist
from minift.distributed import run as mdist_train
from minift.objectives.sft import accumulate_gradients, trained_tokens
from minift.training.config import TrainConfig
from minift.training.schedule import step_groups


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_alone(out)
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same cases on one process, no process group."""
    out = tmp_path_factory.mktemp("single")
    return dict({case_name(*c): run_case(out, *c, 1, 0) for c in CASES}, dir=out)


def test_ranks_joined(runs):
    _, results = runs
    assert [(r["rank"], r["world"]) for r in results] == [(0, WORLD), (1, WORLD)]


@pytest.mark.parametrize("case", [case_name(*c) for c in CASES])
def test_two_processes_match_one(runs, single, case):
    _, results = runs
    for r in results:  # every rank reports the global loss and token count
        got, want = r[case]["steps"], single[case]["steps"]
        assert [s["tokens"] for s in got] == [s["tokens"] for s in want]
        for g, w in zip(got, want):
            assert g["loss"] == pytest.approx(w["loss"], rel=LOSS_RTOL)
            assert g["norm"] == pytest.approx(w["norm"], rel=LOSS_RTOL)


@pytest.mark.parametrize("case", [case_name(*c) for c in CASES])
def test_resume_same_world_size_is_exact(runs, case):
    _, results = runs
    for r in results:
        assert r[case]["resumed"] == r[case]["steps"][2:]


@pytest.mark.parametrize("case", [case_name(*c) for c in CASES])
def test_resume_on_one_process_from_two(runs, case):
    out, results = runs
    parallel, method, accum = next(c for c in CASES if case_name(*c) == case)
    model, params, opt = prepared(parallel, method, 1)
    dckpt.load_sharded(out / f"{case}-ckpt", model, opt, trainable_only=method != "full")
    step3 = run_steps(model, params, opt, accum, 1, 0, 3, 3)[0]
    assert step3["loss"] == pytest.approx(results[0][case]["steps"][2]["loss"], rel=LOSS_RTOL)


def test_sharded_checkpoints_resume_on_three_processes(runs):
    """2-process checkpoints read by 3 processes: steps 3 and 4 as one process runs them from the
    same checkpoint (step 4 shows the optimizer state came across), and the 8-bit states cut into
    3 row blocks equal the whole-model optimizer's."""
    out, _ = runs
    mp.spawn(worker3, args=(free_port(), str(out)), nprocs=THREE, join=True)
    three = [json.loads((out / f"three{r}.json").read_text()) for r in range(THREE)]
    for parallel, method, accum in THREE_CASES:
        name = case_name(parallel, method, accum)
        model, params, opt = prepared(parallel, method, 1)
        dckpt.load_sharded(out / f"{name}-ckpt", model, opt, trainable_only=method != "full")
        alone = run_steps(model, params, opt, accum, 1, 0, 3, 4)
        for r in three:
            for got, want in zip(r[name], alone):
                assert got["loss"] == pytest.approx(want["loss"], rel=LOSS_RTOL), (name, got, want)
                assert got["tokens"] == want["tokens"]
    paged, dtype, stochastic = OPTIM8_CASES[0]
    plain = aligned_model(dtype)
    ref = optim8_run(plain, False, paged, stochastic)
    compared = 0
    for pname, p in plain.named_parameters():
        full, row = ref.state[p], p.numel() // p.shape[0]
        for r in three:
            got = r["optim8"][pname]
            a, b = got["first_row"] * row, (got["first_row"] + got["rows"]) * row  # this rank's values
            if "exp_avg_codes" in got:
                compared += 1
                for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                    assert got[key] == full[key][a:b].tolist(), (pname, key)
                for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                    assert got[key] == full[key][a // 256:b // 256].tolist(), (pname, key)
    assert compared == 3 * 14  # (6 linears, o_proj aside) x 2 layers + embedding + lm_head, on 3 ranks
    assert [r["optim8"]["model.embed_tokens.weight"]["rows"] for r in three] == [84, 84, 83]
    # a rank without rows of a parameter steps nothing, and every rank reloads its (empty) part
    assert [r["empty_shard"]["rows"] for r in three] == [1, 1, 0]
    assert all(r["empty_shard"]["equal"] and r["empty_shard"]["eight_bit"] and r["empty_shard"]["reloaded"]
               for r in three)


def test_load_sharded_names_a_missing_checkpoint(tmp_path):
    model, _, opt = prepared("fsdp", "lora", 1)
    with pytest.raises(FileNotFoundError, match="not a sharded checkpoint"):
        dckpt.load_sharded(tmp_path / "nowhere", model, opt, trainable_only=True)


@pytest.mark.parametrize("key", ["dq1", "dq0"])
def test_nf4_all_gather_is_bit_exact_and_4bit(runs, key):
    _, results = runs
    for r in results:
        got = r["nf4"][key]
        assert got["equal"]  # fp32 and bf16 dequantization after the gather == unsharded layer
        (call,) = got["calls"]  # one all-gather for the layer's one parameter
        assert call["dtype"] == "torch.uint8"
        assert call["sent"] == math.ceil(got["nf4_bytes"] / WORLD) == got["local_bytes"]
        assert call["received"] == call["sent"] * WORLD
        # (96, 80) weight: 3840 packed bytes + scales, against 15360 bytes for a bf16 copy
        assert got["nf4_bytes"] < 0.3 * 96 * 80 * 2


def test_qlora_layer_gathers_its_parameters_as_stored(runs):
    _, results = runs
    for r in results:
        got = r["qlora_layer"]
        received = sum(c["received"] for c in got["calls"])
        assert received == got["expected"]  # every parameter at its stored size: nothing upcast
        assert got["nf4_bytes"] < 0.6 * got["base_numel"]  # ~0.52 bytes per base weight
        assert got["local_numel"] * WORLD >= got["expected"] // 4  # each rank holds 1/WORLD


def _exports(runs, single, case):
    out, _ = runs
    return out / f"{case}-export", single["dir"] / f"{case}-export"


def test_consolidated_adapter_loads_in_peft(runs, single, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    two, one = _exports(runs, single, "fsdp-lora-a2")
    assert sorted(p.name for p in two.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    minift.save_model(make_model("full"), tmp_path / "base")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf, two).eval()
    ours = minift.load_adapter(make_model("lora"), two).eval()
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        want = ours(ids)
        torch.testing.assert_close(peft_model(ids).logits, want, rtol=1e-5, atol=1e-5)
        trained_alone = minift.load_adapter(make_model("lora"), one).eval()(ids)
    torch.testing.assert_close(want, trained_alone, rtol=1e-4, atol=1e-4)  # same training, 1 vs 2 ranks


@pytest.mark.parametrize("case", ["fsdp-qlora-a2", "ddp-lora-a1"])
def test_consolidated_adapter_matches_one_process(runs, single, case):
    two, one = _exports(runs, single, case)
    a, b = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and len(a) == 2 * 7 * 2  # A and B of 7 linears in 2 layers
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_consolidated_full_model_loads_in_transformers(runs, single):
    transformers = pytest.importorskip("transformers")
    two, one = _exports(runs, single, "fsdp-full-a2")
    hf = transformers.LlamaForCausalLM.from_pretrained(two, torch_dtype=torch.float32).eval()
    ours = minift.load_model(two, dtype=torch.float32).eval()
    alone = minift.load_model(one, dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(ids), alone(ids), rtol=1e-4, atol=1e-4)
    # the export is the trained model, not the initial one
    assert not torch.allclose(ours.lm_head.weight, make_model("full").lm_head.weight)


@pytest.mark.parametrize("parallel,method", TRAIN_CASES)
def test_train_two_processes(runs, tmp_path, parallel, method):
    out, results = runs
    run_dir = out / f"train-{parallel}-{method}-w{WORLD}"
    got = [r[f"train-{parallel}-{method}"] for r in results]
    alone = json.loads((out / f"alone-{parallel}-{method}.json").read_text())
    two = got[0]["summary"]
    assert (two["world_size"], two["parallel"]) == (WORLD, parallel)
    assert (alone["world_size"], alone["parallel"]) == (1, None)
    assert got[1]["summary"]["last_loss"] == two["last_loss"]  # every rank reports the global loss
    for key in ("first_loss", "last_loss"):
        assert two[key] == pytest.approx(alone[key], rel=LOSS_RTOL)
    assert (two["trained_tokens"], two["tokens"]) == (alone["trained_tokens"], alone["tokens"])
    # rank 0 alone wrote the metrics: one line per step
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["world_size"] == WORLD
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2, 3]
    # resumed from step 2 on the same world size: the same step 3, bit for bit
    assert got[0]["resumed"]["last_loss"] == two["last_loss"]
    assert got[0]["resumed"]["resumed_from"].endswith("step-2")


@pytest.mark.parametrize("parallel,method", TRAIN_CASES)
def test_train_resumes_a_one_process_checkpoint_on_two(runs, parallel, method):
    """A 1-process checkpoint (safetensors) resumed by 2 processes: FSDP ranks cut their rows of
    the full weights and optimizer moments; step 3 is the 1-process step 3."""
    out, results = runs
    alone = json.loads((out / f"alone-{parallel}-{method}.json").read_text())
    for r in results:
        got = r[f"from1-{parallel}-{method}"]
        assert got["resumed_from"].endswith("step-2") and got["steps"] == 3
        assert (got["world_size"], got["parallel"]) == (WORLD, parallel)
        assert got["last_loss"] == pytest.approx(alone["last_loss"], rel=LOSS_RTOL)
        assert got["last_loss"] != alone["first_loss"]


def test_adamw_moments_of_a_one_process_checkpoint_are_cut_to_rows(runs, single):
    _, results = runs
    want = single["fsdp-lora-a2"]["steps"][2]
    for r in results:
        moments = r["adamw-from1"]["moments"]
        assert len(moments) == 2 * 28  # 2 layers x 7 linears x (A, B), two moments each
        assert all(kind == "DTensor" and equal for kind, equal in moments)
        got = r["adamw-from1"]["steps"][0]
        assert got["loss"] == pytest.approx(want["loss"], rel=LOSS_RTOL)
        assert got["norm"] == pytest.approx(want["norm"], rel=LOSS_RTOL)


@pytest.mark.parametrize("parallel,method", TRAIN_CASES)
def test_train_resumes_on_one_process(runs, tmp_path, parallel, method):
    out, results = runs
    run_dir = tmp_path / f"train-{parallel}-{method}-w1"
    shutil.copytree(out / f"train-{parallel}-{method}-w{WORLD}", run_dir)
    config = train_config(tmp_path, parallel, method, 1, resume_from=str(run_dir / "step-2"))
    summary = minift.train(make_model(method), examples(), config)
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("step-2")
    assert summary["last_loss"] == pytest.approx(results[0][f"train-{parallel}-{method}"]["summary"]["last_loss"],
                                                 rel=LOSS_RTOL)


@pytest.mark.parametrize("case", [optim8_name(*c) for c in OPTIM8_CASES])
def test_8bit_optimizer_on_shards_is_the_one_process_step(runs, case):
    """Row-aligned parameters: each rank's rows and 8-bit states are bit for bit those of the
    whole-model step (stochastic rounding and paging included); DCP round trip exact."""
    _, results = runs
    for r in results:
        got = r[case]
        assert got["rows_equal"] and got["states_equal"] and got["reloaded"], got
        assert got["steps"] == [3]
        # per-shard states: each rank holds about half (the float32 fallbacks of o_proj and the
        # norms are a little more than half of their 8-bit size)
        assert got["local_state_bytes"] < 0.6 * got["full_state_bytes"]
        # o_proj (rows of 64 elements) keeps float32 moments on shards, 8-bit ones on one process
        assert got["kinds"]["model.layers.0.self_attn.o_proj.weight"] == "fp32"
        assert got["kinds"]["model.layers.0.self_attn.q_proj.weight"] == "8bit"
        assert 0 < got["fallback_max_diff"] < 5e-3
    assert results[0][case]["local_state_bytes"] != results[1][case]["local_state_bytes"]  # uneven rows


@pytest.mark.parametrize("paged,dtype,stochastic", OPTIM8_CASES)
def test_8bit_sharded_checkpoint_resumes_on_one_process(runs, paged, dtype, stochastic):
    out, _ = runs
    ref = aligned_model(dtype)
    ref_opt = optim8_run(ref, False, paged, stochastic)
    ref_opt.state_dict()  # paged: write the resident pages back to the host states
    model = aligned_model(dtype)
    opt = minift.AdamW8bit(list(model.parameters()), lr=1e-2, weight_decay=0.1, paged=paged,
                           stochastic_rounding=stochastic)
    dckpt.load_sharded(out / f"{optim8_name(paged, dtype, stochastic)}-ckpt", model, opt, trainable_only=False)
    converted = 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        st, want = opt.state[p], ref_opt.state[q]
        assert st.keys() == want.keys() and st["step"] == 3, name
        if "o_proj" in name:  # float32 moments in the checkpoint, quantized on the way in
            converted += 1
            continue
        assert torch.equal(p, q), name
        for k, v in want.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(st[k], v), (name, k)
    assert converted == 2


@pytest.mark.parametrize("kw,match", [(dict(optimizer_in_backward=True, max_grad_norm=None, grad_accum=1),
                                       "optimizer_in_backward=True with parallel='ddp'")])
def test_torchrun_refuses_what_it_does_not_run(tmp_path, monkeypatch, kw, match):
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    config = train_config(tmp_path, "ddp", "lora", 2, **kw)
    with pytest.raises(ValueError, match=match):
        mdist_train.DistRun(config)
    assert not dist.is_initialized()


def test_parallel_without_torchrun_is_refused(tmp_path):
    config = train_config(tmp_path, "fsdp", "lora", 2)
    with pytest.raises(ValueError, match="TrainConfig.parallel='fsdp' needs a torchrun launch"):
        minift.train(make_model("lora"), examples(), config)


@pytest.mark.slow
def test_example_under_torchrun_matches_one_process(tmp_path):
    """examples/train_llama.py under torchrun (2 gloo processes) against the same flags on one."""
    script = Path(__file__).resolve().parents[1] / "examples" / "train_llama.py"
    flags = ["--method", "qlora", "--max-steps", "2", "--eval-samples", "1", "--device", "cpu", "--batch-size", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {"two": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), str(script)],
            "one": [sys.executable, str(script)]}
    summaries = {}
    for name, cmd in runs.items():
        proc = subprocess.run(cmd + flags + ["--output", str(tmp_path / name)], capture_output=True, text=True,
                              timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    two, one = summaries["two"], summaries["one"]
    assert (two["world_size"], two["parallel"], one["world_size"]) == (2, "fsdp", 1)
    for key in ("first_loss", "last_loss"):
        assert two[key] == pytest.approx(one[key], rel=LOSS_RTOL)
    assert sorted(p.name for p in (tmp_path / "two" / "adapter").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors"]


# ---- one-process pieces: no process group needed -------------------------------------------
def _group(rows_per_batch):
    return [{"input_ids": torch.arange(n * 4).view(n, 4) + 100 * i, "labels": torch.arange(n * 4).view(n, 4),
             "attention_mask": torch.ones(n, 4, dtype=torch.long)} for i, n in enumerate(rows_per_batch)]


@pytest.mark.parametrize("rows,world", [([2, 2], 2), ([3, 1, 2, 2], 2), ([5], 2), ([3], 3), ([1], 2), ([2, 1, 3], 4)])
def test_shard_group_hands_out_every_row_once(rows, world):
    group = _group(rows)
    parts = [mdist.shard_group(group, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # same number of forwards on every rank
    seen = sorted(tuple(row.tolist()) for p in parts for b in p
                  for row, lab in zip(b["input_ids"], b["labels"]) if (lab != -100).any())
    want = sorted(tuple(row.tolist()) for b in group for row in b["input_ids"])
    assert seen == want
    # what the ranks count together is the 1-process count
    assert sum(trained_tokens(b) for p in parts for b in p) == sum(trained_tokens(b) for b in group)


def test_shard_group_on_one_process_is_the_group():
    group = _group([2, 3])
    assert mdist.shard_group(group, 0, 1) is group


def test_world_size_from_the_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'two'"):
        mdist.env_world_size()
    monkeypatch.setenv("WORLD_SIZE", "0")
    with pytest.raises(ValueError, match="WORLD_SIZE must be >= 1"):
        mdist.env_world_size()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR.*torchrun --nproc_per_node"):
        mdist.init_from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert mdist.init_from_env("cpu") == torch.device("cpu") and not dist.is_initialized()


def test_resolve_parallel():
    assert mdist.resolve_parallel(None, 1) is None
    assert mdist.resolve_parallel(None, 4) == "fsdp"
    assert mdist.resolve_parallel("ddp", 4) == "ddp"
    with pytest.raises(ValueError, match="TrainConfig.parallel must be one of fsdp, ddp; got 'zero3'"):
        mdist.resolve_parallel("zero3", 4)


def test_train_config_parallel_fields():
    assert TrainConfig().parallel is None and TrainConfig().fsdp_cpu_offload is False
    with pytest.raises(ValueError, match="TrainConfig.parallel"):
        TrainConfig(parallel="tp")
    with pytest.raises(TypeError, match="TrainConfig.fsdp_cpu_offload must be True or False"):
        TrainConfig(fsdp_cpu_offload="yes")
    with pytest.raises(ValueError, match="TrainConfig.fsdp_cpu_offload=True moves FSDP's shards to "
                                         "host memory, and parallel='ddp' has none"):
        TrainConfig(fsdp_cpu_offload=True, parallel="ddp")


def test_fsdp_cpu_offload_on_one_process_is_refused(monkeypatch):
    # without torchrun nothing is sharded, so the offload would silently do nothing
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=r"TrainConfig.fsdp_cpu_offload=True .* this run is not "
                                         r"sharded: it needs a torchrun launch"):
        mdist_train.DistRun(TrainConfig(fsdp_cpu_offload=True))
    assert not mdist_train.DistRun(TrainConfig()).active


def test_apply_parallel_needs_a_process_group_and_decoder_layers():
    model = make_model("lora")
    assert mdist.apply_parallel(model, SimpleNamespace(parallel=None)) is model  # one process: as is
    with pytest.raises(RuntimeError, match="needs a process group.*init_from_env"):
        mdist.apply_parallel(model, SimpleNamespace(parallel="fsdp"))
    with pytest.raises(ValueError, match="apply_parallel shards one decoder layer at a time, but the "
                                         "Linear has no 'model.layers'"):
        mdist.decoder_layers(nn.Linear(2, 2), "apply_parallel shards one decoder layer at a time")


def test_accumulate_on_one_process_equals_the_loop():
    group = next(step_groups(examples(), step_config(2)))[2]
    grads = []
    for run in ("loop", "distributed"):
        model = make_model("lora")
        if run == "loop":
            loss, n = accumulate_gradients(model, group, "cpu", bf16=False)
        else:
            loss, n = mdist.accumulate_over_ranks(model, group, "cpu", loss_sum, trained_tokens)
        grads.append(([p.grad for p in model.parameters() if p.requires_grad], float(loss), n))
    (g1, l1, n1), (g2, l2, n2) = grads
    assert (l1, n1) == (l2, n2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_a_sharded_save_with_nan_on_one_rank_is_refused_on_every_rank(runs):
    # it used to pass its CRC, be what --resume picked, and hold Inf tensors
    _, results = runs
    for r in results:
        got = r["nonfinite-save"]
        assert got["written"] == []
        assert got["refused"] == ("not saving step 1: tensor 'model.model.layers.0.mlp.up_proj.weight' holds "
                                  "NaN or Inf (rank 1's shard); the newest finite checkpoint is none (no "
                                  "checkpoint was written)")


def test_a_stalled_step_is_said_once_with_the_timeout():
    # a stopped rank leaves the others in a collective until the process group's timeout; the
    # waiting ranks now say so (after a minute by default; 0.2 s here)
    import io
    import time

    out = io.StringIO()
    watch = mdist_train.StallWatch(1800.0, after_s=0.2, factor=10.0, poll_s=0.02, out=out)
    try:
        for step in (1, 2):  # quick steps: nothing said, and they set the usual time
            watch.begin(step)
            watch.end()
        assert out.getvalue() == ""
        watch.begin(3)
        time.sleep(0.6)
        watch.end()
        watch.begin(4)
        watch.end()
    finally:
        watch.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"minift: rank 0: step 3 has run 0 s; finished steps took 0\.0 s; another rank "
                        r"may be stopped or stuck, and this one waits for it in a collective; the job "
                        r"fails after 1800 s of waiting \(TrainConfig.dist_timeout\)", lines[0]), lines[0]
    assert watch.limit() == 0.2  # the median of 0.0, 0.0, 0.6, 0.0 times 10 stays below after_s


def test_the_process_group_timeout_is_a_setting():
    assert TrainConfig().dist_timeout == 1800.0
    with pytest.raises(ValueError, match="TrainConfig.dist_timeout must be a finite number > 0"):
        TrainConfig(dist_timeout=0)
