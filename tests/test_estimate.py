"""estimate_memory: storage formats by hand, bad input, and agreement with MemoryTracker."""
import math

import pytest
import torch

import minift
from minift.memory.estimate import CATEGORIES, estimate_memory
from minift.memory.formulas import adam_state_bytes, nf4_bytes
from minift.memory.tracker import MemoryTracker
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.objectives.sft import accumulate_gradients

SMALL = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def test_nf4_is_about_4_127_bits_per_parameter():
    n = 4096 * 4096
    assert nf4_bytes(n) * 8 / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert nf4_bytes(100) == 50 + 256 + 4 + 64  # absmax codes padded to 256, one scale


def test_optimizer_state_bytes():
    assert adam_state_bytes(10_000, 2, "adamw") == 2 * 10_000 * 2 + 4
    assert adam_state_bytes(10_000, 2, "adamw8bit") == 2 * 10_000 + 8 * math.ceil(10_000 / 256)
    assert adam_state_bytes(4095, 2, "adamw8bit") == 8 * 4095  # below min_8bit_size: fp32


def test_llama2_7b_full_weights_and_qlora_base():
    cfg = ModelConfig.from_name("llama-2-7b")
    full = estimate_memory("llama-2-7b", "full", optimizer="adamw")
    assert full.trainable_params == 2 * cfg.num_parameters() == full.gradients
    assert full.optimizer_states == pytest.approx(4 * cfg.num_parameters(), rel=1e-6)
    q = estimate_memory("llama-2-7b", "qlora", r=16)
    linear = cfg.num_hidden_layers * sum(a * b for a, b in cfg.linear_shapes().values())
    rest = cfg.num_parameters() - linear
    assert q.frozen_weights == pytest.approx(linear * 4.127 / 8 + 2 * rest, rel=1e-3)
    lora_values = cfg.num_hidden_layers * sum(16 * (a + b) for a, b in cfg.linear_shapes().values())
    assert q.trainable_params == 4 * lora_values  # float32 adapters
    # paged 8-bit states live in host pages; the device keeps up to the budget resident (default
    # 1 GiB, more than these LoRA states) and the float32 moments of small tensors
    paged = estimate_memory("llama-2-7b", "lora", optimizer="paged_adamw8bit")
    eight_bit = estimate_memory("llama-2-7b", "lora", optimizer="adamw8bit")
    assert paged.optimizer_states == eight_bit.optimizer_states == paged.host
    none_resident = estimate_memory("llama-2-7b", "lora", optimizer="paged_adamw8bit",
                                    paged_device_budget=0)
    assert none_resident.optimizer_states == 0 and none_resident.host == paged.host


def test_checkpointing_and_longer_sequences():
    base = estimate_memory("llama-3-8b", "lora", 1, 1024)
    assert estimate_memory("llama-3-8b", "lora", 1, 1024, gradient_checkpointing=True).activations \
        < base.activations / 4
    assert estimate_memory("llama-3-8b", "lora", 2, 1024).activations > 1.9 * base.activations
    assert base.total >= base.frozen_weights + base.activations


@pytest.mark.parametrize("kwargs, match", [
    (dict(config_or_preset="llama-9"), "unknown model preset 'llama-9'; known presets: .*llama-3-8b"),
    (dict(batch_size=0), "batch_size must be a positive integer, got 0"),
    (dict(seq_len=-5), "seq_len must be a positive integer, got -5"),
    (dict(method="dora"), "method must be one of full, lora, qlora"),
    (dict(optimizer="sgd"), "optimizer must be one of adamw, adamw8bit"),
    (dict(target_modules=["qkv"]), "target_modules: unknown names \\['qkv'\\]"),
    (dict(target_modules=[]), "target_modules is empty: nothing would be adapted"),
    (dict(target_modules=()), "target_modules is empty"),
    (dict(seq_len=257), r"seq_len 257 is longer than the model's max_position_embeddings \(256\)"),
    (dict(device="tpu"), "device must be 'cuda' or 'cpu'"),
])
def test_bad_input(kwargs, match):
    args = dict(config_or_preset="tiny", seq_len=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        estimate_memory(**args)


def test_bad_types():
    with pytest.raises(TypeError, match="config_or_preset"):
        estimate_memory(42)
    with pytest.raises(TypeError, match="dtype"):
        estimate_memory("tiny", dtype=torch.int8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch_size=2.0), "batch_size must be a positive integer, got float 2.0"),
    (dict(batch_size=True), "batch_size must be a positive integer, got bool True"),
    (dict(seq_len="64"), "seq_len must be a positive integer, got str '64'"),
    (dict(r=8.5), "r must be a positive integer, got float 8.5"),
    (dict(gradient_checkpointing="no"), "gradient_checkpointing must be True or False, got str 'no'"),
    (dict(gradient_checkpointing=1), "gradient_checkpointing must be True or False, got int 1"),
    (dict(attention_mask=None), "attention_mask must be True or False, got NoneType"),
    (dict(target_modules=7), "target_modules must be 'all-linear' or a list of names, got int"),
])
def test_bad_types_name_the_argument(kwargs, match):
    kwargs.setdefault("seq_len", 64)
    with pytest.raises(TypeError, match=match):
        estimate_memory("tiny", **kwargs)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    a = estimate_memory("tiny", "lora", np.int64(2), np.int32(64), r=np.int16(8))
    assert a.as_dict() == estimate_memory("tiny", "lora", 2, 64, r=8).as_dict()
    assert a.settings["batch_size"] == 2 and type(a.settings["batch_size"]) is int


def test_duplicate_target_modules_count_once():
    once = estimate_memory("tiny", "lora", 2, 64, target_modules=["q_proj", "v_proj"])
    twice = estimate_memory("tiny", "lora", 2, 64, target_modules=["q_proj", "v_proj", "q_proj"])
    assert twice.as_dict() == once.as_dict()
    three = estimate_memory("tiny", "lora", 2, 64, target_modules=["q_proj", "v_proj", "k_proj"])
    assert once.trainable_params < three.trainable_params


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_terms_add_up_and_the_peak_is_a_named_moment(method, ckpt):
    est = estimate_memory("llama-3-8b", method, 2, 1024, gradient_checkpointing=ckpt)
    buffers = ("loss_buffers", "step_temporaries", "dequant_scratch")
    assert sum(v for k, v in est.terms.items() if k not in buffers) == est.activations
    assert (est.terms["dequant_scratch"] > 0) == (method == "qlora")
    moments = {"loss", "backward_start", "optimizer_step", "recompute", "recompute_dequant",
               "forward_dequant", "backward_layer_0", "backward_layer_31"}
    assert est.settings["peak_moment"] in moments
    # the step holds at least what is stored; "other" is the peak moment's scratch
    stored = est.frozen_weights + est.trainable_params + est.optimizer_states
    assert est.total > stored and 0 < est.other < est.total - stored


def test_seq_len_up_to_the_model_limit():
    assert estimate_memory("tiny", "lora", 1, 256).total > estimate_memory("tiny", "lora", 1, 255).total


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def _measure(cfg, method, batch_size, seq, optimizer, ckpt, padded=True):
    """Tracker breakdown of the second training step (optimizer states exist from the first)."""
    torch.manual_seed(0)
    model = Llama(cfg).to(torch.bfloat16)
    if method == "qlora":
        minift.quantize_model(model)
    if method != "full":
        for p in model.parameters():
            p.requires_grad_(False)
        minift.lora_wrap(model, r=8, alpha=16)
    model.gradient_checkpointing = ckpt
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if optimizer == "adamw" else \
        minift.AdamW8bit(params, lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -3:] = 0  # one padded row: the model builds a (B, 1, T, T) mask
    batch = {"input_ids": ids, "labels": ids, "attention_mask": mask}
    for _ in range(2):
        tracker = MemoryTracker(model, opt)
        with tracker.track():
            # the step of minift.train: its loss, its logits' lifetime
            accumulate_gradients(model, [batch], "cpu")
            opt.step()
            opt.zero_grad(set_to_none=True)
    return tracker.report().as_dict()


def _compare(name, method, seq, optimizer, ckpt):
    cfg = ModelConfig.from_name("tiny") if name == "tiny" else SMALL
    padded = optimizer != "unpadded"  # without padding the model takes SDPA's causal path
    optimizer = optimizer if padded else "adamw"
    measured = _measure(cfg, method, 2, seq, optimizer, ckpt=ckpt, padded=padded)
    est = estimate_memory(cfg, method, 2, seq, r=8, optimizer=optimizer, device="cpu",
                          gradient_checkpointing=ckpt, attention_mask=padded).as_dict()
    for c in CATEGORIES:
        assert est[c] == pytest.approx(measured[c], rel=0.10, abs=4096), (c, est, measured)
    assert est["total"] == pytest.approx(measured["peak"], rel=0.10), (est, measured)


# every method at three lengths on both configs (the small one has a 512-token vocabulary, so
# the loss buffers weigh more, and 3 layers), plus 8-bit AdamW and an unpadded batch
CASES = [(cfg, m, seq, "adamw") for cfg in ("tiny", "small") for m in ("full", "lora", "qlora")
         for seq in (32, 64, 128)]
CASES += [("small", "full", 32, "adamw8bit"), ("small", "lora", 128, "unpadded")]


@pytest.mark.parametrize("name, method, seq, optimizer", CASES)
def test_estimate_matches_measured_step(name, method, seq, optimizer):
    _compare(name, method, seq, optimizer, ckpt=False)


CKPT_CASES = [(cfg, m, seq, "adamw") for cfg in ("tiny", "small") for m in ("full", "lora", "qlora")
              for seq in (32, 128)]
CKPT_CASES += [("small", m, 64, opt) for m, opt in (("full", "adamw8bit"), ("lora", "unpadded"),
                                                    ("qlora", "adamw"))]


@pytest.mark.parametrize("name, method, seq, optimizer", CKPT_CASES)
def test_estimate_with_checkpointing_matches_measured_step(name, method, seq, optimizer):
    _compare(name, method, seq, optimizer, ckpt=True)


def _record(out_path):
    """Write every compared case (measured, estimated, relative difference) as JSON.

    python tests/test_estimate.py --out docs/benchmarks/estimate_vs_tracker_cpu.json
    """
    import json
    import sys

    from minift.bench.runinfo import git_commit, git_modified, machine_info

    torch.set_num_threads(1)
    rows = []
    for ckpt, cases in ((False, CASES), (True, CKPT_CASES)):
        for name, method, seq, optimizer in cases:
            cfg = ModelConfig.from_name("tiny") if name == "tiny" else SMALL
            padded = optimizer != "unpadded"
            opt = optimizer if padded else "adamw"
            measured = _measure(cfg, method, 2, seq, opt, ckpt=ckpt, padded=padded)
            est = estimate_memory(cfg, method, 2, seq, r=8, optimizer=opt, device="cpu",
                                  gradient_checkpointing=ckpt, attention_mask=padded)
            e = est.as_dict()
            rel = {c: (e[c] / measured[c] - 1 if measured[c] else None) for c in CATEGORIES}
            rel["total"] = e["total"] / measured["peak"] - 1
            rows.append(dict(config=name, method=method, seq_len=seq, batch_size=2, r=8,
                             optimizer=opt, padded=padded, gradient_checkpointing=ckpt,
                             measured=measured, estimate=e,
                             peak_moment=est.settings["peak_moment"], relative_difference=rel))
    worst = {}
    for ckpt in (False, True):
        sel = [r for r in rows if r["gradient_checkpointing"] == ckpt]
        worst["checkpointing" if ckpt else "no_checkpointing"] = {
            k: max(abs(r["relative_difference"][k] or 0) for r in sel)
            for k in CATEGORIES + ("total",)}
    record = {"command": "python tests/test_estimate.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "git_commit": git_commit(),
              "git_modified": git_modified(),
              "what": "estimate_memory(device='cpu') vs MemoryTracker on the second training step "
                      "of random-weight bf16 models (tests/test_estimate.py cases); bytes",
              "worst_abs_relative_difference": worst, "cases": rows}
    with open(out_path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(json.dumps(worst, indent=2))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="record estimate vs measured as JSON")
    parser.add_argument("--out", required=True)
    _record(parser.parse_args().out)
