import pytest
import torch

from minift.quantmaps import dynamic_map, nf4_code

bnb_functional = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    ours = dynamic_map(signed)
    assert ours.shape == (256,) and ours.dtype == torch.float32
    assert torch.equal(ours, bnb_functional.create_dynamic_map(signed))


def test_dynamic_map_properties():
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert torch.all(signed[1:] >= signed[:-1])  # sorted: nearest-entry search can bisect
    assert signed.max() == 1.0 and unsigned.max() == 1.0
    assert unsigned.min() == 0.0 and signed.min() < -0.99


def test_nf4_code_equals_bitsandbytes():
    code = nf4_code()
    assert code[7] == 0.0 and code[0] == -1.0 and code[15] == 1.0
    assert torch.equal(code, bnb_functional.get_4bit_type("nf4", device="cpu"))
