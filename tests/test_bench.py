"""`python -m minift bench`: a two-step run end to end (table, JSON, chart) and its bad input."""
import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from minift.__main__ import main
from minift.bench.methods import BENCH_METHODS
from minift.memory.tracker import CATEGORIES

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The shipped data cut to 24 training and 6 held-out rows, so a run takes seconds."""
    out = tmp_path_factory.mktemp("bench_data")
    for name, n in (("train.jsonl", 24), ("eval.jsonl", 6)):
        lines = (EXAMPLES / "data" / name).read_text(encoding="utf-8").splitlines()[:n]
        (out / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def bench_run(small_data, tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("bench_out")
    threads = torch.get_num_threads()
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["bench", "--model", str(EXAMPLES / "base"), "--data", str(small_data),
                         "--steps", "2", "--batch-size", "4", "--eval-samples", "3",
                         "--max-new-tokens", "6", "--output-dir", str(out), "--threads", "1",
                         "--device", "cpu"])
    finally:
        torch.set_num_threads(threads)  # --threads 1 changed it for the whole process
    return code, stdout.getvalue(), out, stderr.getvalue()


def test_bench_prints_the_table(bench_run):
    code, stdout, out, _ = bench_run
    assert code == 0
    header = ("| method | frozen weights | trainable params | gradients | optimizer states | "
              "activations | other | peak | step time (s) | tokens/s | train loss | eval loss | "
              "exact match |")
    assert header in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("| ") and "MiB" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| full (adamw8bit)", "| lora (adamw)",
                                                 "| qlora (adamw)"]
    for row in rows:
        assert len(row.strip("|").split("|")) == len(header.strip("|").split("|"))
        assert row.rstrip(" |").endswith("/3)")  # exact match as a share and hits/rows
    assert (out / "results.md").read_text().strip() in stdout


def test_bench_results_json(bench_run):
    _, _, out, _ = bench_run
    record = json.loads((out / "results.json").read_text())
    assert {"command", "machine", "git_commit", "git_modified", "settings", "results"} <= set(record)
    assert record["settings"]["steps"] == 2 and record["settings"]["threads"] == 1
    assert record["machine"]["torch"] == torch.__version__ and record["machine"]["cpu_count"] >= 1
    results = record["results"]
    assert [(r["method"], r["optimizer"]) for r in results] == list(BENCH_METHODS)
    by = {r["method"]: r for r in results}
    for r in results:
        mem = r["memory"]
        assert set(CATEGORIES) | {"peak", "device"} <= set(mem) and mem["device"] == "cpu"
        for c in ("trainable_params", "gradients", "optimizer_states", "activations", "peak"):
            assert mem[c] > 0, (r["method"], c)
        # the peak holds at least the weights and states (activations and gradients come and go)
        assert mem["peak"] >= mem["frozen_weights"] + mem["trainable_params"] + mem["optimizer_states"]
        assert r["step_time_s"] > 0 and r["tokens_per_s"] > 0 and r["wall_time_s"] > 0
        assert math.isfinite(r["final_train_loss"]) and r["final_train_loss"] > 0
        assert math.isfinite(r["eval_loss"]) and r["eval_loss"] > 0
        assert 0 <= r["exact_match"] <= 1 and r["eval_samples"] == 3
    # what the three methods are: full trains every weight, LoRA freezes a bf16 base, QLoRA an
    # NF4 one (smaller), both train the same adapters
    assert by["full"]["memory"]["frozen_weights"] == 0
    assert by["lora"]["memory"]["frozen_weights"] == by["full"]["memory"]["trainable_params"]
    assert 0 < by["qlora"]["memory"]["frozen_weights"] < by["lora"]["memory"]["frozen_weights"]
    assert by["lora"]["trainable_params"] == by["qlora"]["trainable_params"] \
        < by["full"]["trainable_params"]


def test_bench_shows_progress_on_stderr(bench_run):
    _, stdout, _, stderr = bench_run
    lines = stderr.splitlines()
    assert [line.split(":")[1].strip() for line in lines if "steps ..." in line] == \
        ["[1/3] full (adamw8bit)", "[2/3] lora (adamw)", "[3/3] qlora (adamw)"]
    assert sum(" done in " in line for line in lines) == 3 and "minift bench:" not in stdout


def test_bench_defaults_work_from_any_folder(tmp_path, monkeypatch):
    from minift.__main__ import build_parser

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["bench"])
    assert Path(args.model, "config.json").is_file() and Path(args.data, "train.jsonl").is_file()
    assert Path(args.model).resolve() == (EXAMPLES / "base").resolve()


@pytest.mark.parametrize("command", ["bench", "plan"])
def test_help_shows_every_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    text = " ".join(out.split())
    # argparse wraps long defaults, and may break a path at a hyphen (/tmp/ci-\nclone/...)
    squeezed = "".join(out.split())
    from minift.__main__ import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    for action in sub._actions:
        if action.default not in (None, "==SUPPRESS==") and not action.required:
            shown = f"(default: {action.default})"
            assert shown in text or "".join(shown.split()) in squeezed or "default" in (action.help or ""), \
                action.dest
    if command == "plan":
        assert "llama-3-8b" in text and "qwen2.5-0.5b" in text  # the presets are listed


def test_bench_writes_the_chart(bench_run):
    _, stdout, out, _ = bench_run
    chart = out / "memory_breakdown.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and chart.stat().st_size > 5000
    assert f"chart: {chart}" in stdout


@pytest.mark.parametrize("argv, match", [
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--batch-size", "-2"], "--batch-size must be a positive integer, got -2"),
    (["--eval-samples", "0"], "--eval-samples must be a positive integer, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer, got 0"),
    (["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["--lr-full", "nan"], "--lr-full must be a finite number > 0, got nan"),
    (["--lr-lora", "-0.001"], "--lr-lora must be a finite number > 0, got -0.001"),
    (["--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--model", "no/such/dir"], "--model: no config.json in 'no/such/dir'"),
    (["--data", "no/such/dir"], "--data: no train.jsonl in 'no/such/dir'"),
])
def test_bench_bad_input_is_one_line_and_exit_2(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--no-chart"] + argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("minift bench: error: ") and match in err[0]


def test_bench_bad_data_row_is_one_line(tmp_path, capsys):
    shutil.copy(EXAMPLES / "data" / "eval.jsonl", tmp_path / "eval.jsonl")
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--no-chart", "--data", str(tmp_path), "--model", str(EXAMPLES / "base")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minift bench: error: --model/--data: "), err


def test_results_are_replaced_atomically(tmp_path, monkeypatch):
    import argparse
    import os

    from minift.bench.methods import write_outputs

    args = argparse.Namespace(output_dir=str(tmp_path), no_chart=True, chart=None)
    result = {"method": "lora", "optimizer": "adamw", "memory": {}, "step_time_s": 0.1,
              "tokens_per_s": 10.0, "final_train_loss": 1.0, "eval_loss": 1.0,
              "exact_match": None, "eval_samples": 0}
    write_outputs({"results": [result]}, args)
    before = {n: (tmp_path / n).read_text() for n in ("results.json", "results.md")}

    def killed(src, dst):
        raise KeyboardInterrupt("killed while writing the results")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_outputs({"results": [dict(result, final_train_loss=0.5)]}, args)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_text() for n in ("results.json", "results.md")} == before
