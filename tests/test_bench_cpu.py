"""`python -m minift bench cpu`: a tiny run end to end, its numbers' bookkeeping, bad input."""
import contextlib
import io
import json
import platform

import pytest
import torch

from minift.__main__ import build_parser, main
from minift.bench import cpu as bench_cpu

TINY = ["--hidden", "64", "--intermediate", "128", "--heads", "4", "--layers", "2", "--vocab", "256",
        "--batch", "1", "--seq", "16", "--rounds", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("bench_cpu") / "peers.json"
    threads = torch.get_num_threads()
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(["bench", "cpu", *TINY, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # --threads 1 changed it for the whole process
    return code, stdout.getvalue(), json.loads(out.read_text())


def _check_timing(t, rounds=2):
    assert len(t["times_s"]) == rounds and all(x > 0 for x in t["times_s"])
    assert t["min_s"] <= t["median_s"] <= t["max_s"]


@pytest.mark.slow  # the peers' imports and a first optimizer take ~30 s on a busy 2-core CPU
def test_tiny_run_times_every_side_and_records_the_machine(tiny_run):
    code, stdout, record = tiny_run
    assert code == 0
    assert record["machine"]["cpu_model"] and record["torch_threads"] == 1
    if platform.machine() in ("x86_64", "AMD64"):  # every x86-64 CPU this runs on has AVX at least
        assert any(f.startswith("avx") for f in record["machine"]["cpu_vector_flags"])
    assert f"CPU: {record['machine']['cpu_model']}" in stdout and "vector flags: " in stdout
    assert set(record["load_average_1min"]) == {"before", "after"}
    res = record["results"]
    optim = res["optim"]["timings"]
    assert set(optim) == {"minift AdamW8bit", "bitsandbytes AdamW8bit", "torch AdamW (fp32 states)"}
    for t in optim.values():
        _check_timing(t)
    assert res["optim"]["ratio_vs_bitsandbytes"] == pytest.approx(
        optim["minift AdamW8bit"]["median_s"] / optim["bitsandbytes AdamW8bit"]["median_s"])
    assert res["nf4"]["weights"] == 2 * 7 and res["nf4"]["bit_identical_outputs"] is True
    for method in ("full", "lora", "qlora"):
        entry = res["train"][method]
        for t in entry["timings"].values():
            _check_timing(t)
        assert entry["ratio_vs_peer"] == pytest.approx(
            entry["timings"]["minift"]["median_s"] / entry["timings"]["transformers+peft"]["median_s"])
        # same weights, same batch: both sides start from the same loss
        losses = entry["first_loss"]
        assert losses["minift"] == pytest.approx(losses["transformers+peft"], rel=1e-4)
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "what" not in line]
    assert len(rows) == 2 + 1 + 3  # two optimizer peers, NF4, three methods


def test_summary_and_interleaving_order():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    out = bench_cpu.interleaved(fns, rounds=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # a warm-up each, then alternating rounds
    assert set(out) == {"a", "b"} and len(out["a"]["times_s"]) == 3
    s = bench_cpu.summarize([1.0, 3.0, 2.0])
    assert (s["median_s"], s["min_s"], s["max_s"], s["spread"]) == (2.0, 1.0, 3.0, 1.0)


def test_bench_without_a_mode_keeps_its_options():
    args = build_parser().parse_args(["bench", "--steps", "3"])
    assert args.command == "bench" and args.bench_mode is None and args.steps == 3
    args = build_parser().parse_args(["bench", "cpu", "--rounds", "4"])
    assert args.bench_mode == "cpu" and args.rounds == 4


@pytest.mark.parametrize("extra,match", [
    (["--rounds", "0"], "--rounds must be a positive integer, got 0"),
    (["--hidden", "96", "--heads", "4"], "--hidden must be a multiple of 64, got 96"),
    (["--hidden", "64", "--heads", "5"], "--hidden 64 is not a multiple of --heads 5"),
    (["--sections", "optim,gpu"], "--sections: unknown ['gpu']"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
])
def test_bad_input_is_one_line_and_exit_2(extra, match, capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "cpu", *extra])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert match in message and message.count("\n") == 1
