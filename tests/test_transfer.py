"""minift/data/transfer.py and the training step's host-device syncs: counted on CPU with
tests/sync_counter.py, and ruled out in the model by running it on the meta device, which has
no values, so that any read of one raises."""
import torch
from sync_counter import SyncCounter
from torch.overrides import TorchFunctionMode

from minift.data.sft import batch_examples
from minift.data.transfer import to_device
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.objectives.loss import token_loss_sum
from minift.objectives.sft import _batch_loss_sum, accumulate_gradients

EXAMPLES = [{"input_ids": list(range(1, n + 1)), "labels": [-100] * 2 + list(range(3, n + 1))}
            for n in (5, 9, 7, 12)]


def _model(layers):
    config = ModelConfig.from_name("tiny")
    config.num_hidden_layers = layers
    return Llama(config)


def test_sync_counter_counts_reads_and_host_copies():
    x = torch.randn(4)
    with SyncCounter() as syncs:
        x.sum().item(), bool(x[0] > 0), float(x[1]), x.cpu(), x.tolist(), x[x > 0], x.nonzero()
        x.to("cpu", non_blocking=True)
        x * 2, x.to(torch.float64), x.sum()  # compute and dtype casts stay on the device
    assert len(syncs) == 8, syncs.log


def test_step_syncs_do_not_grow_with_layers():
    # The loop's phases 2-3 (forward/backward of every micro-batch, clipping, reading loss and
    # norm). A per-parameter or per-layer read would make the 3-layer count larger.
    def count(layers, mode):
        model = _model(layers)
        params = [p for p in model.parameters() if p.requires_grad]
        group = batch_examples(EXAMPLES, 2, pad_id=0, mode=mode, max_length=16, shuffle=False)
        with SyncCounter() as syncs:
            loss, _ = accumulate_gradients(model, group, "cpu")
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            float(loss), float(norm)
        return syncs.log

    for mode in ("bucket", "pack"):
        one, three = count(1, mode), count(3, mode)
        assert one == three, (mode, one, three)
    # and the counter would see a per-parameter sync: the per-tensor finiteness check of old
    for layers in (1, 3):
        model = _model(layers)
        with SyncCounter() as syncs:
            for p in model.parameters():
                bool(torch.isfinite(p).all())
        assert len(syncs) == len(list(model.parameters()))


def test_model_reads_no_device_value_in_forward_or_backward():
    model = _model(2).to("meta")
    for mode in ("bucket", "pack"):
        batch = batch_examples(EXAMPLES, 4, pad_id=0, mode=mode, max_length=16, shuffle=False)[0]
        assert not bool(batch["attention_mask"].all())  # padded: the mask is used
        inputs = to_device(batch, "meta")  # what _batch_loss_sum does (autocast knows no meta)
        labels = inputs.pop("labels")
        loss = token_loss_sum(model(**inputs), labels)
        loss.backward()  # a .item() or bool() on a meta tensor would raise here
        assert loss.device.type == "meta"
        model.zero_grad()


class _Log(TorchFunctionMode):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            self.log.append(("to", id(args[0]), kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


def test_labels_reach_the_device_before_the_forward():
    model = _model(1)
    batch = batch_examples(EXAMPLES, 4, pad_id=0, shuffle=False)[0]
    log = []
    model.register_forward_pre_hook(lambda *_: log.append(("forward",)))
    with _Log(log):
        _batch_loss_sum(model, batch, torch.device("cpu"), bf16=False)
    labels_copy = ("to", id(batch["labels"]), True)
    assert labels_copy in log and log.index(labels_copy) < log.index(("forward",))
    assert all(entry[2] for entry in log if entry[0] == "to" and entry[1] in
               {id(v) for v in batch.values()})  # every batch tensor without blocking


def test_to_device_drops_only_an_all_ones_mask():
    padded = batch_examples(EXAMPLES, 4, pad_id=0, shuffle=False)[0]
    full = batch_examples(EXAMPLES[:1], 1, pad_id=0, shuffle=False)[0]
    packed = batch_examples(EXAMPLES[:2], 1, pad_id=0, mode="pack", max_length=14, shuffle=False)[0]
    assert bool(packed["attention_mask"].all())  # 5 + 9 tokens fill the row
    assert "attention_mask" in to_device(padded, "cpu")
    assert set(to_device(full, "cpu")) == {"input_ids", "labels"}
    assert set(to_device(packed, "cpu")) == set(packed)  # packing needs its segments anyway
    moved = to_device(padded, "meta")
    assert all(v.device.type == "meta" for v in moved.values())
    model = _model(1).eval()
    with torch.no_grad():  # dropping the mask changes nothing
        assert torch.equal(model(**{k: v for k, v in to_device(full, "cpu").items() if k != "labels"}),
                           model(full["input_ids"], attention_mask=full["attention_mask"]))
