"""minift/optim/in_backward.py: the optimizer step inside backward equals the normal step."""
import math

import pytest
import torch

from minift.memory.tracker import MemoryTracker
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.names import IGNORE_INDEX
from minift.objectives.loss import model_loss_sum
from minift.optim import AdamW8bit, PagedAdamW8bit
from minift.optim.in_backward import StepInBackward, check_step_in_backward

CFG = ModelConfig(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4)
OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw8bit": lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.1),
    # a budget of two 4096-element pages: some pages stay resident, the rest stream
    "paged_adamw8bit": lambda ps: PagedAdamW8bit(ps, lr=1e-2, weight_decay=0.1, page_size=4096,
                                                 device_budget_bytes=2 * 8300),
}


def data(steps=3):
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 160, (2, 10), generator=gen)
        labels = ids.clone()
        labels[:, :2] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def loss_of(model, ids, labels):
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return model_loss_sum(model, {"input_ids": ids}, labels, 8) / n


def run_normal(model, opt, batches):
    losses = []
    for ids, labels in batches:
        loss = loss_of(model, ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def run_in_backward(model, opt, batches):
    losses = []
    with StepInBackward(opt) as stepper:
        for ids, labels in batches:
            stepper.reset()
            loss = loss_of(model, ids, labels)
            loss.backward()
            assert all(p.grad is None for p in model.parameters())
            losses.append(float(loss.detach()))
    return losses


def model_pair():
    torch.manual_seed(0)
    a = Llama(CFG)
    b = Llama(CFG)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_weights_identical_to_normal_step(name):
    a, b = model_pair()
    batches = data()
    assert run_normal(a, OPTIMIZERS[name](list(a.parameters())), batches) == \
        run_in_backward(b, OPTIMIZERS[name](list(b.parameters())), batches)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


@pytest.mark.parametrize("name", ["adamw", "paged_adamw8bit"])
def test_resume_from_state_dict_is_exact(name):
    a, b = model_pair()
    batches = data(3)
    opt_a = OPTIMIZERS[name](list(a.parameters()))
    run_in_backward(a, opt_a, batches)  # uninterrupted
    opt_b = OPTIMIZERS[name](list(b.parameters()))
    run_in_backward(b, opt_b, batches[:2])
    saved = ({k: v.clone() for k, v in b.state_dict().items()}, opt_b.state_dict())
    torch.manual_seed(0)
    c = Llama(CFG)
    c.load_state_dict(saved[0])
    opt_c = OPTIMIZERS[name](list(c.parameters()))
    opt_c.load_state_dict(saved[1])
    run_in_backward(c, opt_c, batches[2:])
    for (n, pa), pc in zip(a.named_parameters(), c.parameters()):
        assert torch.equal(pa, pc), n


def test_gradient_peak_is_one_parameter():
    a, b = model_pair()
    ids, labels = data(1)[0]
    opt = torch.optim.AdamW(b.parameters(), lr=1e-3)
    largest = max(p.nbytes for p in b.parameters())
    with StepInBackward(opt):
        tracker = MemoryTracker(b, opt)
        with tracker.track():
            loss_of(b, ids, labels).backward()
    report = tracker.report()
    assert report.gradients == largest  # the 160 x 64 embedding / head
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-3)
    normal = MemoryTracker(a, opt_a)
    with normal.track():
        run_normal(a, opt_a, [(ids, labels)])
    assert normal.report().gradients == sum(p.nbytes for p in a.parameters())
    assert report.optimizer_states == normal.report().optimizer_states


def test_grad_norm_is_the_global_norm():
    a, b = model_pair()
    ids, labels = data(1)[0]
    loss_of(a, ids, labels).backward()
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in a.parameters()]))
    with StepInBackward(torch.optim.AdamW(b.parameters(), lr=1e-3)) as stepper:
        loss_of(b, ids, labels).backward()
    assert math.isclose(stepper.grad_norm(), expected, rel_tol=1e-5)


def test_nonfinite_gradient_makes_the_norm_nan_and_is_named():
    # The hooks do not read a gradient's norm (a sync per parameter on a GPU): every parameter
    # is stepped, the norm is NaN, and `nonfinite` names the parameters once the step is over.
    a, b = model_pair()
    for model in (a, b):
        model.model.norm.weight.register_hook(lambda g: g * float("nan"))
    ids, labels = data(1)[0]
    loss_of(a, ids, labels).backward()
    bad = {id(p) for p in a.parameters() if not torch.isfinite(p.grad).all()}
    names = {id(p): n for n, p in a.named_parameters()}
    with StepInBackward(torch.optim.AdamW(b.parameters(), lr=1e-3)) as stepper:
        loss_of(b, ids, labels).backward()
    assert math.isnan(stepper.grad_norm())
    by_shape = [f"(shape {tuple(p.shape)})" for p in a.parameters() if id(p) in bad]
    assert len(stepper.nonfinite) == len(bad) >= 1, (stepper.nonfinite, [names[i] for i in bad])
    assert sorted(n.split(" ", 1)[1] for n in stepper.nonfinite) == sorted(by_shape)
    assert "shape (64,)" in stepper.nonfinite[0]  # the final norm's gradient comes first
    assert not torch.isfinite(b.model.norm.weight).all()  # stepped with its NaN gradient
    stepper.reset()
    assert stepper.nonfinite == [] and float(stepper.grad_norm()) == 0.0


def test_hooks_removed_on_exit():
    _, b = model_pair()
    opt = torch.optim.AdamW(b.parameters(), lr=1e-3)
    with StepInBackward(opt):
        pass
    ids, labels = data(1)[0]
    loss_of(b, ids, labels).backward()
    assert all(p.grad is not None for p in b.parameters())  # nothing stepped, nothing freed
    assert not opt.state


@pytest.mark.parametrize("kw, field", [(dict(max_grad_norm=1.0, grad_accum=1), "max_grad_norm"),
                                       (dict(max_grad_norm=None, grad_accum=2), "grad_accum")])
def test_refused_settings_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"optimizer_in_backward.*{field}"):
        check_step_in_backward(**kw)
