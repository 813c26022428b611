"""minift/memory/dpo.py: the DPO step's memory estimate against the tracker on a small model
(LoRA and QLoRA, adapters-off reference), and the reference options' arithmetic."""
import pytest
import torch

import minift
from minift.config import ModelConfig
from minift.dpo import AdapterReference, DPOObjective
from minift.memory import estimate_memory
from minift.memory.dpo import estimate_dpo_memory
from minift.memory.plan import plan
from minift.memory.tracker import CATEGORIES, MemoryTracker
from minift.model import Llama
from minift.preference import collate_pairs

SMALL = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def measure(method, pairs, seq):
    """Tracker breakdown of the second DPO step (the first creates the optimizer states)."""
    torch.manual_seed(0)
    model = Llama(SMALL).to(torch.bfloat16)
    if method == "qlora":
        minift.quantize_model(model)
    model.requires_grad_(False)
    minift.lora_wrap(model, r=8, alpha=16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, objective = pair_batch(pairs, seq), DPOObjective(AdapterReference(model), beta=0.1)
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
        want = estimate_dpo_memory(cfg, m, 1, 1024, r=16, gradient_checkpointing=True)
        assert dpo["methods"][m]["estimate"].total == want.total
        assert dpo["methods"][m]["max_batch_size"] <= sft["methods"][m]["max_batch_size"]
