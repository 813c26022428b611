"""``python -m minift bench infer`` on a tiny model: every field present and the numbers consistent."""
import json

import pytest
import torch

from minift.__main__ import main
from minift.lora.adapter import save_adapter
from minift.lora.layer import lora_layers, lora_wrap
from minift.models.loading import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    """A work directory with a LoRA adapter of the shared tiny model as ``adapter``."""
    root = tmp_path_factory.mktemp("infer")
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, dtype=torch.float32)
    lora_wrap(model, r=2, alpha=4)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    save_adapter(model, root / "adapter")
    return root


def _run(base, tiny, *extra):
    out = tiny / "out.json"
    assert main(["bench", "infer", str(base), "--batch", "1,2", "--new-tokens", "4", "--rounds", "2",
                 "--prompt-tokens", "3", "--no-peer", "--price-per-hour", "2.0", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


def _check(record, sides):
    assert record["notes"] == {"transformers": "skipped (--no-peer)"}
    assert set(record["sides"]) == set(sides)
    assert all(s["weight_bytes"] > 0 for s in record["sides"].values())
    assert set(record["results"]) == {"batch_1", "batch_2"}
    for key, result in record["results"].items():
        batch = int(key.removeprefix("batch_"))
        assert set(result) == set(sides)
        for r in result.values():
            assert r["runs"] == 2 and r["forwards_per_run"] == [4, 4]  # one forward per new token
            lat = r["token_latency_s"]
            assert lat["n"] == 2 * 3 and 0 < lat["p50"] <= lat["p99"]
            assert 0 < r["ttft_s"]["min"] <= r["ttft_s"]["median"] <= r["ttft_s"]["max"]
            assert r["tokens"] == batch * 4 * 2
            assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["time_s"])
            assert r["time_s"] >= 2 * r["ttft_s"]["min"]  # the prompt forwards are inside
            assert r["cost_per_1m_tokens_usd"] == pytest.approx(2.0 / 3600 / r["tokens_per_s"] * 1e6)
            assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] > 0
        assert result["minift"]["p50_ratio_vs_minift"] == 1.0


def test_nf4_run_times_the_float32_and_cached_sides(tiny_model_dir, tiny):
    record = _run(tiny_model_dir, tiny, "--quant", "nf4")
    _check(record, {"minift", "minift float32", "minift nf4 cache"})
    cache = record["sides"]["minift nf4 cache"]["cache"]
    assert cache["layers"] == 14 and cache["bytes"] == 4 * 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)
    # the cached path computes the same bits as the default path: same greedy tokens
    assert all(r["minift nf4 cache"]["same_tokens_as_minift"] for r in record["results"].values())


def test_adapter_run_times_the_merged_side(tiny_model_dir, tiny):
    record = _run(tiny_model_dir, tiny, "--adapter", str(tiny / "adapter"))
    _check(record, {"minift", "minift merged"})
    assert record["settings"]["adapter"].endswith("adapter")
    assert "steps" not in record["settings"]  # the parent bench command's options stay out
    # the recorded command names the run's own options
    assert record["command"].startswith("python -m minift bench infer ")
    assert f"--adapter {tiny / 'adapter'}" in record["command"]


def test_peer_decodes_every_token_past_an_end_of_text_argmax(tiny_model_dir):
    """transformers' side decodes the same tokens as minift's even where the end-of-text token is
    the argmax: it neither stops there nor forbids it."""
    transformers = pytest.importorskip("transformers")
    from minift.bench.infer import _peer_generate
    from minift.models.generation import generate
    ids = torch.tensor([[5, 17, 3, 99]])
    mine = generate(load_model(tiny_model_dir, dtype=torch.float32), ids, max_new_tokens=6, eos_token_id=[])
    peer = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    peer.generation_config.eos_token_id = int(mine[0, ids.shape[1] + 1])  # greedy picks it at step 2
    assert torch.equal(_peer_generate(peer, 6)(ids), mine)
