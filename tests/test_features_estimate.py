"""The memory features through estimate_memory: each lowers what it is for, or moves it to the
host, on the CPU path and the CUDA path; and what the CUDA path does differently from the CPU's."""
import dataclasses

import pytest
import torch
from minift.kernels import HAS_TRITON

from minift import estimate_memory
from minift.models.config import ModelConfig
from minift.planning.agreement import model_config

SMALL = model_config()  # 3 layers, hidden 128, 4 query / 2 key-value heads, vocabulary 512
B, T = 2, 64
BF16 = 2


def small(method="lora", cfg=SMALL, seq_len=T, **kw):
    kw.setdefault("device", "cpu")
    return estimate_memory(cfg, method, B, seq_len, **kw)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_loss_chunks_lower_the_peak_at_a_large_vocabulary(device):
    cfg = dataclasses.replace(SMALL, vocab_size=8192)
    full = small(cfg=cfg, loss_chunk_size=None, device=device)
    chunked = small(cfg=cfg, loss_chunk_size=32, device=device)
    logits = B * T * cfg.vocab_size * 4  # the (B * T, V) float32 logits; the plain loss holds more than one
    assert full.total - chunked.total > logits
    assert chunked.total < 0.6 * full.total


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_activation_offload_moves_the_layer_inputs_to_the_host(method, device):
    kept = small(method, gradient_checkpointing=True, device=device)
    moved = small(method, gradient_checkpointing=True, activation_offload=True, device=device)
    one_layer = B * T * SMALL.hidden_size * BF16  # what checkpointing keeps of a layer: its input
    assert kept.host == 0 and moved.host == SMALL.num_hidden_layers * one_layer
    # the device keeps at most the layer whose input is being brought back
    assert kept.activations - moved.activations >= (SMALL.num_hidden_layers - 1) * one_layer


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_optimizer_in_backward_keeps_one_gradient_at_a_time(device):
    after = small("full", max_grad_norm=None, device=device)
    during = small("full", max_grad_norm=None, optimizer_in_backward=True, device=device)
    assert after.gradients == after.trainable_params == 2 * SMALL.num_parameters()
    # the largest gradient alive at once: the embedding's (or lm_head's), in bf16
    assert during.gradients == SMALL.vocab_size * SMALL.hidden_size * BF16
    assert during.optimizer_states == after.optimizer_states


def test_paged_8bit_states_live_on_the_host_beyond_the_budget():
    eight = small("full", optimizer="adamw8bit")
    resident = small("full", optimizer="paged_adamw8bit")  # TrainConfig's 1 GiB holds every page here
    part = small("full", optimizer="paged_adamw8bit", paged_device_budget=200_000)
    paged = small("full", optimizer="paged_adamw8bit", paged_device_budget=0)
    assert eight.host == 0 and resident.optimizer_states == eight.optimizer_states
    assert paged.host == part.host == resident.host > 0  # the host copy of every page
    # with no budget the device keeps only the float32 states of tensors too small for 8 bits
    assert paged.host + paged.optimizer_states == eight.optimizer_states
    assert paged.optimizer_states < eight.optimizer_states / 100
    assert paged.optimizer_states < part.optimizer_states <= paged.optimizer_states + 200_000
    assert paged.total < eight.total


def test_bf16_adapters_halve_the_trainable_bytes():
    f32 = small()
    bf16 = small(adapter_dtype=torch.bfloat16)
    values = SMALL.num_hidden_layers * sum(16 * (a + b) for a, b in SMALL.linear_shapes().values())
    assert f32.trainable_params == 4 * values and bf16.trainable_params == 2 * values
    assert bf16.gradients * 2 == f32.gradients
    assert bf16.frozen_weights == f32.frozen_weights


def test_nf4_stores_the_frozen_linears_in_about_four_bits():
    lora, qlora = small("lora"), small("qlora")
    head = small("qlora", lm_head_nf4=True)
    linear = SMALL.num_hidden_layers * sum(a * b for a, b in SMALL.linear_shapes().values())
    rest = SMALL.num_parameters() - linear  # embeddings, lm_head, norms: bf16
    assert lora.frozen_weights == BF16 * SMALL.num_parameters()
    # 4-bit codes, plus each block's absmax (8-bit, with float32 scales) and the code books
    assert linear / 2 < qlora.frozen_weights - BF16 * rest < linear * 4.5 / 8
    assert qlora.trainable_params == lora.trainable_params
    lm_head = SMALL.vocab_size * SMALL.hidden_size
    assert qlora.frozen_weights - head.frozen_weights > lm_head * (BF16 - 4.5 / 8)


def test_mlp_tiles_lower_the_checkpointed_activations():
    kw = dict(gradient_checkpointing=True, seq_len=2 * T)
    whole, tiles_64, tiles_16 = (small(mlp_tile_size=t, **kw) for t in (None, T, 16))
    assert tiles_16.activations < tiles_64.activations < whole.activations
    assert tiles_16.host == 0


def test_accumulated_micro_batches_hold_one_micro_batch_of_activations():
    one, two = small(), small(grad_accum=2)
    double = estimate_memory(SMALL, "lora", 2 * B, T, device="cpu")
    assert two.activations <= one.activations < double.activations
    # the gradients of the first micro-batch wait through the second
    assert one.total <= two.total < double.total


def test_features_are_checked():
    with pytest.raises(ValueError, match="gradient_checkpointing=True"):
        small(activation_offload=True)
    with pytest.raises(ValueError, match="loss_chunk_size must be a positive integer or None, got 0"):
        small(loss_chunk_size=0)
    with pytest.raises(TypeError, match="activation_offload must be True or False"):
        small(gradient_checkpointing=True, activation_offload="yes")


# ---- the CUDA path ------------------------------------------------------------------------------------
def _padding_bytes(device, seq_len):
    padded = small(seq_len=seq_len, device=device, attention_mask=True)
    full_rows = small(seq_len=seq_len, device=device, attention_mask=False)
    return padded.activations - full_rows.activations


def test_padded_batches_take_flex_attention_on_cuda_and_a_dense_mask_on_the_cpu():
    """The CPU's SDPA saves a (B, 1, T, T) mask per layer for backward: quadratic in T. Flex
    attention (CUDA) keeps a block mask and per-row statistics: linear in T."""
    cpu = [_padding_bytes("cpu", t) for t in (T, 4 * T)]
    cuda = [_padding_bytes("cuda", t) for t in (T, 4 * T)]
    assert cpu[0] >= SMALL.num_hidden_layers * B * T * T  # at least a byte per mask entry per layer
    assert cpu[1] >= 14 * cpu[0]  # 4x the length: 16x the mask
    assert 0 < cuda[1] <= 5 * cuda[0]


def test_the_fused_kernels_save_less_for_backward_on_cuda():
    cpu = small("full", attention_mask=False)
    cuda = small("full", attention_mask=False, device="cuda")
    assert cuda.activations < 0.85 * cpu.activations
    for key in ("trainable_params", "gradients", "optimizer_states"):
        assert getattr(cuda, key) == getattr(cpu, key), key


@pytest.mark.skipif(not HAS_TRITON, reason="the fused 8-bit step is the CUDA path only with Triton")
def test_the_8bit_step_is_fused_on_cuda():
    """On the CPU the 8-bit step dequantizes each tensor's states to float32 (the step is the peak
    here); the CUDA kernel updates them in place."""
    cpu = small("full", optimizer="adamw8bit", attention_mask=False)
    cuda = small("full", optimizer="adamw8bit", attention_mask=False, device="cuda")
    assert cpu.moment.startswith("optimizer step") and not cuda.moment.startswith("optimizer step")
    assert cuda.other < cpu.other / 2 and cuda.total < cpu.total


@pytest.mark.slow  # one trace of Llama-3.1-8B: ~20 s on 2 cores
def test_every_feature_on_llama_31_8b_full_fine_tuning():
    cfg = ModelConfig.from_name("llama-3.1-8b")
    n, seq = cfg.num_parameters(), 2048
    est = estimate_memory(cfg, "full", B, seq, optimizer="paged_adamw8bit", gradient_checkpointing=True,
                          attention_mask=False, loss_chunk_size=256, activation_offload=True,
                          optimizer_in_backward=True, max_grad_norm=None, paged_device_budget=0)
    assert est.trainable_params == BF16 * n
    assert est.gradients == cfg.vocab_size * cfg.hidden_size * BF16  # the embedding's, one at a time
    assert est.optimizer_states == 0  # every tensor (norms of 4096 values too) is 8-bit and paged
    layer_inputs = cfg.num_hidden_layers * B * seq * cfg.hidden_size * BF16
    assert est.host == layer_inputs + 2 * n + 8 * n // 256  # 8-bit moments and their absmax, on the host
    # neither a second 16 GB (all gradients) nor the states: the weights and 2.2 GB besides
    assert est.total < 1.15 * est.trainable_params
