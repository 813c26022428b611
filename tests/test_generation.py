import pytest
import torch
from test_model import FAMILIES, GENERATION_STD, hf_model, minift_from_hf

from minift.models.config import ModelConfig
from minift.models.generation import generate
from minift.models.llama import Llama

MIN_DISTINCT = 8  # of 20 greedy tokens: a continuation that moves on, not one token repeated


def left_padded(batch=3, length=8, pads=(3, 0, 5)):
    ids = torch.randint(3, 128, (batch, length))
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return ids.masked_fill(mask == 0, 0), mask


def varied_reference(hf, make_prompt, new_tokens, tries=20):
    """(ids, mask, transformers' greedy output) for the first random prompt whose continuation
    has MIN_DISTINCT distinct tokens in every row. Small random models fall into one-token loops
    for some prompts (tied ones most), and such a prompt would barely exercise the KV cache."""
    for _ in range(tries):
        ids, mask = make_prompt()
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        if all(len(set(row.tolist())) >= MIN_DISTINCT for row in ref[:, ids.shape[1]:]):
            return ids, mask, ref
    pytest.fail(f"none of {tries} random prompts gave a varied greedy continuation")


def assert_greedy_matches(hf, model, new_tokens=20):
    """minift's greedy continuation equals transformers' on one prompt and a left-padded batch,
    each continuation varied enough to exercise the KV cache."""
    single = lambda: (torch.randint(3, 128, (1, 7)), torch.ones(1, 7, dtype=torch.long))  # noqa: E731
    ids, _, ref = varied_reference(hf, single, new_tokens)
    assert torch.equal(generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[]), ref)
    ids, mask, ref = varied_reference(hf, left_padded, new_tokens)
    ours = generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
    assert ours.shape == (3, 8 + new_tokens) and torch.equal(ours, ref)
    # A padded row continues exactly as its prompt alone does.
    alone = generate(model, ids[2:, 5:], max_new_tokens=new_tokens, eos_token_id=[])
    assert torch.equal(alone[0], ours[2, 5:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers(family):
    hf = hf_model(family, std=GENERATION_STD)
    assert_greedy_matches(hf, minift_from_hf(hf))


def tiny_model():
    torch.manual_seed(0)
    return Llama(ModelConfig.from_name("tiny"))


def test_rows_stop_at_eos_and_are_padded():
    model = tiny_model()
    ids = torch.randint(3, 256, (2, 5))
    free = generate(model, ids, max_new_tokens=12, eos_token_id=[])
    eos = int(free[0, 5 + 3])  # row 0's fourth new token becomes the end token
    out = generate(model, ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=255)
    stops = []
    for row in range(2):
        new = free[row, 5:]
        hits = (new == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else len(new)
        stops.append(stop)
        assert torch.equal(out[row, :5 + stop], free[row, :5 + stop])
        assert (out[row, 5 + stop:] == 255).all()
    assert stops[0] <= 4
    assert out.shape[1] == 5 + max(stops)


def test_generation_stops_when_every_row_ended():
    model = tiny_model()
    ids = torch.randint(3, 256, (1, 4))
    free = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    out = generate(model, ids, max_new_tokens=6, eos_token_id=[int(free[0, 5]), 9999])
    assert torch.equal(out, free[:, :6])  # stopped right after the second new token


def test_default_eos_comes_from_config():
    model = tiny_model()
    ids = torch.randint(3, 256, (1, 4))
    free = generate(model, ids, max_new_tokens=6, eos_token_id=[])
    model.config.eos_token_id = int(free[0, 4])
    assert torch.equal(generate(model, ids, max_new_tokens=6), free[:, :5])


def test_sampling_is_reproducible_and_top_p_narrows_to_greedy():
    model = tiny_model()
    # A fresh model's next-token distribution is nearly flat, so two seeds differ.
    ids = torch.randint(3, 256, (2, 4))
    kw = dict(max_new_tokens=10, temperature=1.0, eos_token_id=[])
    a = generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, ids, generator=torch.Generator().manual_seed(1), **kw)
    c = generate(model, ids, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(model, ids, max_new_tokens=10, eos_token_id=[])
    nucleus = generate(model, ids, top_p=1e-6, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(nucleus, greedy)


def test_training_mode_restored_and_no_graph():
    model = tiny_model().train()
    out = generate(model, torch.randint(3, 256, (1, 3)), max_new_tokens=2, eos_token_id=[])
    assert model.training and not out.requires_grad and out.dtype == torch.long
    model.eval()
    generate(model, torch.randint(3, 256, (1, 3)), max_new_tokens=2)
    assert not model.training


def test_lora_wrapped_model_generates_like_base():
    lora = pytest.importorskip("minift.lora.layer")
    model = tiny_model()
    ids = torch.randint(3, 256, (2, 5))
    base = generate(model, ids, max_new_tokens=8, eos_token_id=[])
    lora.lora_wrap(model, r=4)  # lora_B starts at zero: same function as the base
    assert any("lora_" in n for n, _ in model.named_parameters())
    assert torch.equal(generate(model, ids, max_new_tokens=8, eos_token_id=[]), base)


def test_bad_arguments_are_named():
    model = tiny_model()
    ids = torch.randint(3, 256, (2, 4))
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, ids, attention_mask=mask)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, ids, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        generate(model, ids, top_p=0)
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, seq_len\) tensor"):
        generate(model, ids[0])
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, ids, attention_mask=mask[:, :2])


def test_nf4_model_generates_like_its_dequantized_weights():
    from minift.nf4.linear import NF4Linear, quantize_model
    model = quantize_model(tiny_model())
    plain = tiny_model()
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            plain.get_submodule(name).weight.data = module.dequantize(torch.float32)
    ids = torch.randint(3, 256, (2, 5))
    out = generate(model, ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(out, generate(plain, ids, max_new_tokens=8, eos_token_id=[]))


def test_token_id_outside_the_vocabulary_is_one_line():
    model = tiny_model()
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"input_ids holds token id {vocab}, outside the model's "
                                         rf"vocabulary of {vocab} \(ids 0..{vocab - 1}\)"):
        generate(model, torch.tensor([[1, 2, vocab]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="token id -1"):
        generate(model, torch.tensor([[1, -1]]), max_new_tokens=2)
