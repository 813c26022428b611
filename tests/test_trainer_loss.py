"""The training loss of minift/training/loop.py: shifted labels, no (B, T, V) copy of the logits."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minift.objectives.loss import token_loss_sum


def _sliced_logits_loss(logits, labels):
    """The formula the loss had before: shift the logits (a copy), upcast, sum."""
    shifted = logits[:, :-1].float().reshape(-1, logits.size(-1))  # (B*(T-1), V)
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 300), (3, 17, 1000), (1, 2, 5)])
def test_equals_the_sliced_logits_formula(shape, dtype):
    b, t, v = shape
    logits = (torch.randn(b, t, v) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t))
    labels[:, : t // 3] = -100  # a prompt that is not trained on
    old = _sliced_logits_loss(logits, labels)
    (old_grad,) = torch.autograd.grad(old, logits)
    new = token_loss_sum(logits, labels)
    (new_grad,) = torch.autograd.grad(new, logits)
    # same terms; the sum may group them differently (a few ulps), the gradient is bit-equal
    torch.testing.assert_close(new, old, rtol=1e-6, atol=0)
    assert new.dtype == torch.float32 and torch.equal(new_grad, old_grad)


def test_the_last_position_and_ignored_labels_add_nothing():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), -100)
    assert token_loss_sum(logits, labels).item() == 0.0
    labels[0, 4] = 3  # predicted by position 3; the last position predicts nothing
    (grad,) = torch.autograd.grad(token_loss_sum(logits, labels), logits)
    assert grad[0, 3].abs().sum() > 0
    assert grad[0, 4].abs().sum() == 0 and grad[1].abs().sum() == 0
    expected = F.cross_entropy(logits[0, 3:4], torch.tensor([3]), reduction="sum")
    torch.testing.assert_close(token_loss_sum(logits, labels), expected)


class _FullSizeOps(TorchDispatchMode):
    """Names of the operators whose output has at least ``size`` elements."""

    def __init__(self, size):
        super().__init__()
        self.size, self.names = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() >= self.size:
            self.names.append(func.overloadpacket.__name__)
        return out


_VIEWS = {"view", "_unsafe_view", "slice", "reshape", "alias", "detach", "expand", "t"}


@pytest.mark.parametrize("loss", [token_loss_sum, _sliced_logits_loss])
def test_no_full_size_copy_forward_or_backward(loss):
    b, t, v = 2, 32, 50
    logits = torch.randn(b, t, v, requires_grad=True)
    labels = torch.randint(0, v, (b, t))
    with _FullSizeOps(b * (t - 1) * v) as ops:
        loss(logits, labels).backward()
    made = [name for name in ops.names if name not in _VIEWS]
    # log-softmax output and its gradient are inherent; anything else is a copy or a zero fill
    extra = [name for name in made if name not in ("_log_softmax", "_log_softmax_backward_data",
                                                   "nll_loss_backward")]
    if loss is token_loss_sum:
        assert extra == [], extra
    else:  # the premise: slicing the logits copies forward and zero-fills backward
        assert extra, made
