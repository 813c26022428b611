"""minift/memory/dpo.py: the DPO step's memory estimate against the tracker on a small model
(LoRA and QLoRA, adapters-off reference), and the reference options' arithmetic."""
import dataclasses

import pytest
import torch

import minift
from minift.data.preference import collate_pairs
from minift.memory import estimate_memory
from minift.memory.dpo import estimate_dpo_memory
from minift.memory.tracker import CATEGORIES, MemoryTracker
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.models.switches import gradient_checkpointing
from minift.objectives.dpo import AdapterReference, DPOObjective
from minift.planning.plan import plan

SMALL = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def pair_batch(pairs, seq):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(pairs):
        prompt = torch.randint(3, 512, (seq // 2,), generator=g).tolist()
        chosen = torch.randint(3, 512, (seq - seq // 2,), generator=g).tolist()
        rejected = torch.randint(3, 512, (seq - seq // 2 - 3,), generator=g).tolist()
        out.append({"chosen_ids": prompt + chosen, "chosen_labels": [-100] * len(prompt) + chosen,
                    "rejected_ids": prompt + rejected,
                    "rejected_labels": [-100] * len(prompt) + rejected})
    return collate_pairs(out, 0)


def measure(method, pairs, seq, cfg=SMALL, chunk=None):
    """Tracker breakdown of the second DPO step (the first creates the optimizer states); with
    ``chunk``, chunked log-probs and gradient checkpointing (what the estimate of it assumes)."""
    torch.manual_seed(0)
    model = Llama(cfg).to(torch.bfloat16)
    if method == "qlora":
        minift.quantize_model(model)
    model.requires_grad_(False)
    minift.lora_wrap(model, r=8, alpha=16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = pair_batch(pairs, seq)
    objective = DPOObjective(AdapterReference(model), beta=0.1, loss_chunk_size=chunk)
    with gradient_checkpointing(model, chunk is not None):
        for _ in range(2):
            tracker = MemoryTracker(model, opt)
            with tracker.track():
                objective.step(model, [batch], torch.device("cpu"))
                opt.step()
                opt.zero_grad(set_to_none=True)
    return tracker.report().as_dict()


@pytest.mark.parametrize("method, pairs, seq", [("lora", 1, 64), ("lora", 2, 128),
                                                ("qlora", 1, 64), ("qlora", 2, 128)])
def test_dpo_estimate_matches_the_tracked_step(method, pairs, seq):
    measured = measure(method, pairs, seq)
    est = estimate_dpo_memory(SMALL, method, pairs, seq, r=8, device="cpu").as_dict()
    for c in CATEGORIES:
        assert est[c] == pytest.approx(measured[c], rel=0.05, abs=4096), (c, est, measured)
    assert est["total"] == pytest.approx(measured["peak"], rel=0.05)
    # and the DPO step is not an SFT step of B sequences: it holds 2B
    sft = estimate_memory(SMALL, method, pairs, seq, r=8, device="cpu")
    assert measured["activations"] > 1.8 * sft.activations


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_chunked_dpo_estimate_matches_the_tracked_step(method):
    """Vocabulary 4096: the (2B, T, V) logits dominate unchunked; 32-token chunks remove them."""
    cfg = dataclasses.replace(SMALL, vocab_size=4096)
    full = measure(method, 2, 128, cfg)
    chunked = measure(method, 2, 128, cfg, chunk=32)
    est = estimate_dpo_memory(cfg, method, 2, 128, r=8, device="cpu", gradient_checkpointing=True,
                              loss_chunk_size=32)
    assert chunked["peak"] < 0.4 * full["peak"]
    # the estimate takes the policy's loss as the chunked SFT loss: a little above the DPO step
    assert chunked["peak"] <= est.total <= 1.1 * chunked["peak"]
    assert est.terms["reference_forward"] == 32 * 4096 * (2 + 4 + 4) + 2 * 2 * 128 * 128 * 2


def test_reference_options():
    kw = dict(gradient_checkpointing=True)
    lora = estimate_dpo_memory("llama-3-8b", "lora", 1, 1024, **kw)
    sft2 = estimate_memory("llama-3-8b", "lora", 2, 1024, **kw)
    assert lora.terms["reference_weights"] == 0 and lora.total >= sft2.total
    assert lora.terms["sequences"] == 2 and lora.settings["reference"] == "adapters"
    full = estimate_dpo_memory("llama-3-8b", "full", 1, 1024, optimizer="paged_adamw8bit", **kw)
    full_sft = estimate_memory("llama-3-8b", "full", 2, 1024, optimizer="paged_adamw8bit", **kw)
    assert full.terms["reference_weights"] == full_sft.trainable_params  # a whole second copy
    nf4 = estimate_dpo_memory("llama-3-8b", "full", 1, 1024, optimizer="paged_adamw8bit",
                              reference="copy_nf4", **kw)
    qlora_base = estimate_memory("llama-3-8b", "qlora", 1, 1024).frozen_weights
    # embeddings and lm_head stay 16-bit: 5.3 GiB instead of 15 GiB for Llama-3-8B
    assert nf4.terms["reference_weights"] == qlora_base < full.terms["reference_weights"] / 2.5
    pre = estimate_dpo_memory("llama-3-8b", "full", 1, 1024, optimizer="paged_adamw8bit",
                              reference="precomputed", **kw)
    assert pre.terms["reference_weights"] == pre.terms["reference_forward"] == 0
    assert pre.total == full_sft.total < nf4.total < full.total
    # reference forward: logits (2B, T, V) in bf16 + float32 copy + float32 log-softmax
    assert lora.terms["reference_forward"] == 2 * 1024 * 128256 * (2 + 4 + 4)


def test_bad_reference_and_batch():
    with pytest.raises(ValueError, match="reference='adapters' needs LoRA or QLoRA"):
        estimate_dpo_memory("tiny", "full", reference="adapters")
    with pytest.raises(ValueError, match="reference must be one of adapters, copy"):
        estimate_dpo_memory("tiny", "lora", reference="ema")
    with pytest.raises(ValueError, match="batch_size must be a positive number of pairs"):
        estimate_dpo_memory("tiny", "lora", 0)


def test_planner_plans_the_dpo_stage():
    cfg = ModelConfig.from_name("llama-3-8b")
    sft = plan(cfg, 24 * 2**30, seq_len=1024, gradient_checkpointing=True)
    dpo = plan(cfg, 24 * 2**30, seq_len=1024, gradient_checkpointing=True, objective="dpo")
    for m in ("lora", "qlora"):
        want = estimate_dpo_memory(cfg, m, 1, 1024, r=16, gradient_checkpointing=True, loss_chunk_size=1024)
        assert dpo["methods"][m]["estimate"].total == want.total
        assert dpo["methods"][m]["max_batch_size"] <= sft["methods"][m]["max_batch_size"]


def _record(out_path):
    """The docs/memory.md DPO table as JSON: estimates for 7B/8B (SFT vs DPO, LoRA and QLoRA,
    full with each reference) and the small-model tracked-vs-estimated cases.

    python tests/test_memory_dpo.py --out docs/benchmarks/dpo_memory.json
    """
    import json
    import sys

    from minift.bench.runinfo import git_commit, git_modified, machine_info

    torch.set_num_threads(1)
    settings = dict(seq_len=1024, r=16, gradient_checkpointing=True, dtype="bfloat16",
                    optimizer="adamw (lora, qlora); paged_adamw8bit (full)", batch="1 example "
                    "(SFT) vs 1 pair (DPO)")
    big = []
    for preset in ("llama-2-7b", "llama-3-8b"):
        for method in ("lora", "qlora", "full"):
            opt = "paged_adamw8bit" if method == "full" else "adamw"
            kw = dict(r=16, optimizer=opt, gradient_checkpointing=True)
            row = {"model": preset, "method": method,
                   "sft": estimate_memory(preset, method, 1, 1024, **kw).as_dict()}
            refs = ("copy", "copy_nf4", "precomputed") if method == "full" else ("adapters",)
            for ref in refs:
                est = estimate_dpo_memory(preset, method, 1, 1024, reference=ref, **kw)
                row[f"dpo_{ref}"] = dict(est.as_dict(), peak_moment=est.settings["peak_moment"],
                                         reference_weights=est.terms["reference_weights"],
                                         reference_forward=est.terms["reference_forward"])
            big.append(row)
    small = []
    for method, pairs, seq in (("lora", 1, 64), ("lora", 2, 128), ("qlora", 1, 64),
                               ("qlora", 2, 128)):
        measured = measure(method, pairs, seq)
        est = estimate_dpo_memory(SMALL, method, pairs, seq, r=8, device="cpu").as_dict()
        small.append({"method": method, "pairs": pairs, "seq_len": seq, "measured": measured,
                      "estimate": est, "relative_difference": est["total"] / measured["peak"] - 1})
    record = {"command": "python tests/test_memory_dpo.py " + " ".join(sys.argv[1:]),
              "machine": machine_info(), "git_commit": git_commit(), "git_modified": git_modified(),
              "what": "DPO step memory: estimate_dpo_memory for 7B/8B presets (bytes) and "
                      "estimate vs MemoryTracker on the second DPO step of a small bf16 model "
                      "(hidden 128, 3 layers, vocab 512) on CPU",
              "settings_7b_8b": settings, "estimates_7b_8b": big, "tracked_small_cpu": small}
    with open(out_path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="record the DPO memory table as JSON")
    parser.add_argument("--out", required=True)
    _record(parser.parse_args().out)
