"""minift/objectives/loss.py: the chunked lm_head + cross-entropy equals the full-logits loss and gradients."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from minift.lora.layer import LoRALinear
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.names import IGNORE_INDEX
from minift.nf4.linear import NF4Linear
from minift.objectives.loss import (
    chunked_loss_sum,
    chunked_row_logps,
    model_loss_sum,
    shift_labels,
    token_loss_sum,
)

CFG = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4)


def tiny(**kw):
    return Llama(ModelConfig(**dict(CFG, **kw)))


def batch(b=2, t=11, vocab=300, prompt=3):
    ids = torch.randint(0, vocab, (b, t))
    labels = ids.clone()
    labels[:, :prompt] = IGNORE_INDEX  # prompts are not trained
    return ids, labels


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def both(model, ids, labels, chunk, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        full = token_loss_sum(model(ids), labels)
    g_full = grads_of(model, full)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        chunked = model_loss_sum(model, {"input_ids": ids}, labels, chunk)
    g_chunk = grads_of(model, chunked)
    return full, chunked, g_full, g_chunk


def test_shift_labels_moves_left_and_ignores_last():
    labels = torch.tensor([[5, 6, 7], [8, IGNORE_INDEX, 9]])
    assert shift_labels(labels).tolist() == [[6, 7, IGNORE_INDEX], [IGNORE_INDEX, 9, IGNORE_INDEX]]


@pytest.mark.parametrize("chunk", [1, 5, 7, 22, 1000])  # 22 = B*T, 5 and 7 do not divide it
def test_full_model_fp32_matches_unchunked(chunk):
    model = tiny()
    ids, labels = batch()
    full, chunked, g_full, g_chunk = both(model, ids, labels, chunk)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    assert set(g_chunk) == set(g_full) and "lm_head.weight" in g_chunk
    for name in g_full:
        torch.testing.assert_close(g_chunk[name], g_full[name], rtol=1e-5, atol=1e-6, msg=name)


def test_tied_embeddings_get_both_gradients_once():
    model = tiny(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, labels = batch()
    calls = []
    model.model.embed_tokens.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    full, chunked, g_full, g_chunk = both(model, ids, labels, 4)
    # one accumulation per backward: the head's and the embedding's gradients arrive summed
    assert len(calls) == 2
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_chunk["model.embed_tokens.weight"],
                               g_full["model.embed_tokens.weight"], rtol=1e-5, atol=1e-6)


def test_lora_head_matches_unchunked():
    model = tiny()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head = LoRALinear(model.lm_head, r=4)
    nn.init.normal_(model.lm_head.lora_B.weight, std=0.1)  # B != 0 so A gets a gradient
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(True)  # a trainable layer below
    ids, labels = batch()
    full, chunked, g_full, g_chunk = both(model, ids, labels, 6)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    assert set(g_full) == {"lm_head.lora_A.weight", "lm_head.lora_B.weight",
                           "model.layers.1.mlp.down_proj.weight"} == set(g_chunk)
    for name in g_full:
        torch.testing.assert_close(g_chunk[name], g_full[name], rtol=1e-5, atol=1e-6, msg=name)


def test_nf4_head_input_gradient_matches():
    head = NF4Linear.from_linear(nn.Linear(32, 300, bias=False))
    hidden = torch.randn(2, 9, 32, requires_grad=True)
    labels = torch.randint(0, 300, (2, 9))
    full = token_loss_sum(head(hidden), labels)
    (g_full,) = torch.autograd.grad(full, hidden)
    chunked = chunked_loss_sum(hidden, head, labels, 4)
    (g_chunk,) = torch.autograd.grad(chunked, hidden)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_chunk, g_full, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_within_stated_tolerance():
    # bf16 logits are the same per element; sums are grouped differently, so gradients agree to
    # bf16 rounding: 2e-2 relative on the loss sum's gradients, 1e-3 on the fp32 loss.
    model = tiny()
    ids, labels = batch(t=16)
    full, chunked, g_full, g_chunk = both(model, ids, labels, 5, autocast=True)
    torch.testing.assert_close(chunked, full, rtol=1e-3, atol=1e-3)
    for name in g_full:
        torch.testing.assert_close(g_chunk[name], g_full[name], rtol=2e-2, atol=2e-3, msg=name)


def test_scaled_loss_scales_gradients_exactly():
    # the trainer divides the sum by the step's trained tokens: backward must apply that scale
    model = tiny()
    ids, labels = batch()
    n = int((shift_labels(labels) != IGNORE_INDEX).sum())
    g_full = grads_of(model, token_loss_sum(model(ids), labels) / n)
    g_chunk = grads_of(model, model_loss_sum(model, {"input_ids": ids}, labels, 3) / n)
    for name in g_full:
        torch.testing.assert_close(g_chunk[name], g_full[name], rtol=1e-5, atol=1e-7, msg=name)


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(2, 9), chunk=st.integers(1, 30),
       prompt=st.integers(0, 8))
def test_loss_sum_property(b, t, chunk, prompt):
    head = nn.Linear(8, 50, bias=False)
    hidden = torch.randn(b, t, 8)
    labels = torch.randint(0, 50, (b, t))
    labels[:, :prompt] = IGNORE_INDEX
    with torch.no_grad():
        torch.testing.assert_close(chunked_loss_sum(hidden, head, labels, chunk),
                                   token_loss_sum(head(hidden), labels), rtol=1e-6, atol=1e-5)


def test_all_ignored_is_zero_with_zero_gradients():
    model = tiny()
    ids, _ = batch()
    labels = torch.full_like(ids, IGNORE_INDEX)
    loss = model_loss_sum(model, {"input_ids": ids}, labels, 4)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert float(model.lm_head.weight.grad.abs().sum()) == 0.0


def test_no_grad_eval_keeps_no_graph():
    model = tiny()
    ids, labels = batch()
    with torch.no_grad():
        loss = model_loss_sum(model, {"input_ids": ids}, labels, 4)
        ref = token_loss_sum(model(ids), labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_bad_chunk_size_is_named(bad):
    with pytest.raises(ValueError, match="loss_chunk_size"):
        chunked_loss_sum(torch.zeros(1, 2, 4), nn.Linear(4, 5), torch.zeros(1, 2, dtype=torch.long), bad)


def test_model_without_lm_head_is_refused_clearly():
    class LogitsOnly(nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 7)

    with pytest.raises(ValueError, match="no 'lm_head' module"):
        model_loss_sum(LogitsOnly(), {"input_ids": torch.zeros(1, 3, dtype=torch.long)},
                       torch.zeros(1, 3, dtype=torch.long), 2)


def test_model_still_returns_logits_by_default():
    model = tiny()
    ids, _ = batch()
    assert tuple(model(ids).shape) == (2, 11, 300)
    assert tuple(model(ids, return_hidden=True).shape) == (2, 11, 32)


class _Largest(TorchDispatchMode):
    """Records the largest tensor (elements) any operator returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_all_logits_is_created():
    model = tiny()
    ids, labels = batch(b=2, t=40)
    with _Largest() as seen:
        model_loss_sum(model, {"input_ids": ids}, labels, 8).backward()
    # full logits would be 2 * 40 * 300 = 24,000 elements; one chunk's are 8 * 300 = 2,400,
    # the largest other tensor is the head's weight/gradient (300 * 32 = 9,600)
    assert seen.largest == 300 * 32


def test_one_chunk_for_every_token_is_the_plain_loss():
    """chunk >= B * T: the plain loss runs (two (N, V) float32 buffers at its peak, not the chunked
    path's three), so its value and gradients are the unchunked ones bit for bit."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 5))
    got = chunked_loss_sum(hidden, head, labels, 10)
    got.backward()
    grads = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None
    want = token_loss_sum(head(hidden), labels)
    want.backward()
    assert torch.equal(got, want)
    assert torch.equal(grads[0], hidden.grad) and torch.equal(grads[1], head.weight.grad)


def test_the_estimate_of_one_chunk_for_every_token_is_the_full_logits():
    """The traced step takes the plain loss when one chunk holds all B * T tokens, and the chunked
    one as soon as it does not."""
    from minift import estimate_memory

    def estimate(chunk):
        est = estimate_memory("tiny", "lora", 2, 100, loss_chunk_size=chunk, device="cpu").as_dict()
        return est.pop("moment"), est

    plain = estimate(None)
    assert estimate(2 * 100) == estimate(10_000) == plain
    assert estimate(2 * 100 - 1)[1] != plain[1] and estimate(100)[1] != plain[1]


def test_row_logps_backward_replays_the_heads_dropout():
    # a head with dropout (a LoRA lm_head): the chunked backward runs the head again and must
    # draw the forward's masks, or its gradient belongs to another network
    torch.manual_seed(0)
    n, t, h, v, chunk = 3, 5, 8, 11, 4
    head = nn.Sequential(nn.Dropout(0.5), nn.Linear(h, v))
    hidden = torch.randn(n, t, h, requires_grad=True)
    labels = torch.randint(0, v, (n, t))
    labels[:, :2] = IGNORE_INDEX
    weights = torch.tensor([0.5, -1.0, 2.0])
    # the same chunks through plain autograd (masks kept by autograd), from the same RNG state
    torch.manual_seed(1)
    flat, targets = hidden.reshape(n * t, h), shift_labels(labels).reshape(-1)
    want = torch.zeros(n)
    for start in range(0, n * t, chunk):
        y = targets[start:start + chunk]
        if bool((y != IGNORE_INDEX).any()):
            nll = F.cross_entropy(head(flat[start:start + chunk]).float(), y, ignore_index=IGNORE_INDEX,
                                  reduction="none")
            want = want.index_add(0, torch.arange(start, start + y.shape[0]) // t, -nll)
    (want * weights).sum().backward()
    want_grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    got, _ = chunked_row_logps(hidden, head, labels, chunk)
    after_forward = torch.get_rng_state()
    (got * weights).sum().backward()
    assert torch.equal(torch.get_rng_state(), after_forward)  # the backward consumed no draws
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for mine, theirs in zip([hidden.grad] + [p.grad for p in head.parameters()], want_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
