"""minift/models/offload.py: checkpointed layer inputs in host memory give bit-identical training."""
import pytest
import torch

from minift.lora.layer import lora_wrap
from minift.memory.tracker import MemoryTracker
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.models.offload import ActivationOffload
from minift.models.switches import mlp_tiling
from minift.names import IGNORE_INDEX
from minift.objectives.loss import model_loss_sum

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2)
B, T = 2, 12


def batch():
    ids = torch.randint(0, 128, (B, T))
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    return ids, labels


def run(model, ids, labels, offload, autocast=False):
    model.train()
    model.gradient_checkpointing = True
    model.activation_offload = offload
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model_loss_sum(model, {"input_ids": ids}, labels, 16)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_bit_identical_losses_and_gradients(autocast, lora):
    model = Llama(CFG)
    if lora:
        model = lora_wrap(model, r=4)
    ids, labels = batch()
    loss_off, grads_off = run(model, ids, labels, False, autocast)
    loss_on, grads_on = run(model, ids, labels, True, autocast)
    assert torch.equal(loss_on, loss_off)
    assert set(grads_on) == set(grads_off) and grads_on
    for name in grads_off:
        assert torch.equal(grads_on[name], grads_off[name]), name


def test_host_buffers_are_pooled_one_per_layer():
    model = Llama(CFG)
    ids, labels = batch()
    for _ in range(3):
        run(model, ids, labels, True)
    offload = model.offloader(torch.device("cpu"))
    # one (B, T, hidden) fp32 input per layer, allocated once and reused every step
    assert offload.host_bytes == CFG.num_hidden_layers * B * T * CFG.hidden_size * 4


def test_prefetch_runs_one_layer_ahead(monkeypatch):
    model = Llama(CFG)
    ids, labels = batch()
    offload = model.offloader(torch.device("cpu"))
    fetched, restored = [], []
    fetch, restore = ActivationOffload._fetch, ActivationOffload._restore

    def spy_fetch(self, saved):
        fetched.append(saved.layer)
        return fetch(self, saved)

    def spy_restore(self, saved):
        restored.append((saved.layer, saved.ready is not None))
        return restore(self, saved)

    monkeypatch.setattr(ActivationOffload, "_fetch", spy_fetch)
    monkeypatch.setattr(ActivationOffload, "_restore", spy_restore)
    run(model, ids, labels, True)
    assert offload is model.offloader(torch.device("cpu"))
    # backward visits the last layer first: it is fetched on demand, every other one ahead
    assert fetched == [2, 1, 0]
    assert restored == [(2, False), (1, True), (0, True)]


def test_buffer_is_not_reused_while_its_graph_is_alive():
    model = Llama(CFG)
    ids, labels = batch()
    model.train()
    model.gradient_checkpointing = model.activation_offload = True
    first = model_loss_sum(model, {"input_ids": ids}, labels, 16)
    second = model_loss_sum(model, {"input_ids": ids.flip(1)}, labels.flip(1), 16)
    first.backward()
    grads_first = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.activation_offload = False
    reference = model_loss_sum(model, {"input_ids": ids}, labels, 16)
    reference.backward()
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads_first[n]), n
    del second


def test_tracker_moves_layer_inputs_to_host():
    model = Llama(CFG)
    ids, labels = batch()
    run(model, ids, labels, False)  # warm-up
    reports = {}
    for offload in (False, True):
        tracker = MemoryTracker(model)
        with tracker.track():
            run(model, ids, labels, offload)
        reports[offload] = tracker.report()
    layer_input = B * T * CFG.hidden_size * 4
    assert reports[False].host == 0
    assert reports[True].host == CFG.num_hidden_layers * layer_input
    # the device keeps no layer input between forward and backward any more
    assert reports[False].activations - reports[True].activations >= \
        (CFG.num_hidden_layers - 1) * layer_input


@pytest.mark.parametrize("tile", [5, 12, 100])
def test_mlp_tiles_match_the_whole_sequence(tile):
    model = Llama(CFG)
    ids, labels = batch()
    loss_ref, grads_ref = run(model, ids, labels, False)
    with mlp_tiling(model, tile):
        assert all(layer.mlp_tile_size == tile for layer in model.model.layers)
        loss, grads = run(model, ids, labels, True)
    assert all(layer.mlp_tile_size is None for layer in model.model.layers)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for name in grads_ref:  # weight gradients are sums over tiles: rounding order differs
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mlp_tiles_keep_no_whole_sequence_intermediate():
    model = Llama(CFG)
    ids, labels = batch()
    largest = {}
    for tile in (None, 4):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Widest(TorchDispatchMode):
            most = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[-1] == 96:
                    self.most = max(self.most, out.shape[1])  # tokens of a (B, T, intermediate)
                return out

        with mlp_tiling(model, tile), Widest() as seen:
            run(model, ids, labels, False)
        largest[tile] = seen.most
    assert largest == {None: T, 4: 4}


@pytest.mark.parametrize("offload", [False, True])
def test_device_layer_inputs_are_freed_after_forward(offload):
    import weakref

    model = Llama(CFG)
    ids, labels = batch()
    model.train()
    model.gradient_checkpointing, model.activation_offload = True, offload
    inputs = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
    loss = model_loss_sum(model, {"input_ids": ids}, labels, 16)
    alive = [r() is not None for r in inputs]
    # without offload the checkpoint keeps every layer input until backward; with it none
    assert alive == [not offload] * CFG.num_hidden_layers
    loss.backward()
