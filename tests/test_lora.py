"""Tests for minift/lora/layer.py: the LoRA layer's math, model surgery, merging and counts."""
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import minift
from minift.lora.layer import LoRALinear, find_targets, lora_state_dict, lora_wrap, merge_lora

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # machine epsilon

layer_cases = st.fixed_dictionaries({
    "n_in": st.integers(1, 24), "n_out": st.integers(1, 24), "r": st.integers(1, 8),
    "alpha": st.floats(0.25, 64.0), "rslora": st.booleans(), "dtype": st.sampled_from(DTYPES),
    "bias": st.booleans(), "batch": st.integers(1, 5), "seed": st.integers(0, 2 ** 16)})


def make_layer(case, random_b=True, adapter_dtype=torch.float32):
    torch.manual_seed(case["seed"])
    base = nn.Linear(case["n_in"], case["n_out"], bias=case["bias"], dtype=case["dtype"])
    layer = LoRALinear(base, r=case["r"], alpha=case["alpha"], rslora=case["rslora"],
                       adapter_dtype=adapter_dtype)
    if random_b:
        with torch.no_grad():
            layer.lora_B.weight.normal_()
    x = torch.randn(case["batch"], 3, case["n_in"], dtype=case["dtype"])
    return layer, x


def rounding_bound(layer, x, eps):
    """Rounding-error scale of both paths: eps * |x| @ (|W| + s |B| |A|)^T, elementwise."""
    a, b = layer.lora_A.weight.float().abs(), layer.lora_B.weight.float().abs()
    w = layer.base_layer.weight.float().abs() + layer.scale * b @ a
    return eps * (x.float().abs() @ w.t() + 1.0)


class Tiny(nn.Module):
    """A small stand-in model with HF-style names: two blocks and an output head."""

    def __init__(self, d=8, vocab=11):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "q_proj": nn.Linear(d, d), "v_proj": nn.Linear(d, d, bias=False),
            "xq_proj": nn.Linear(d, d), "norm": nn.LayerNorm(d)}) for _ in range(2))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.layers:
            h = block["norm"](h + block["q_proj"](h) * block["v_proj"](h) + block["xq_proj"](h))
        return self.lm_head(h)


# ---- the layer -------------------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(layer_cases)
def test_fresh_wrap_equals_base_exactly(case):
    layer, x = make_layer(case, random_b=False)
    assert torch.equal(layer(x), layer.base_layer(x))


@settings(max_examples=20, deadline=None)
@given(layer_cases)
def test_merged_forward_equals_unmerged(case):
    layer, x = make_layer(case)
    unmerged = layer(x).float()
    layer.merge()
    merged = layer(x).float()
    assert layer.merged
    # an exact update would differ; within rounding the two paths must agree
    assert ((merged - unmerged).abs() <= 8 * rounding_bound(layer, x, EPS[case["dtype"]])).all()


@settings(max_examples=20, deadline=None)
@given(layer_cases)
def test_unmerge_restores_weight(case):
    layer, _ = make_layer(case)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight, w0)
    layer.unmerge()
    eps = EPS[case["dtype"]]
    bound = 4 * eps * (w0.float().abs() + layer.delta_weight().abs()) + 1e-30
    assert ((layer.base_layer.weight.float() - w0.float()).abs() <= bound).all()
    assert not layer.merged


def test_scale_and_rslora():
    base = nn.Linear(4, 4)
    assert LoRALinear(base, r=4, alpha=16).scale == 4.0
    assert LoRALinear(base, r=4, alpha=16, rslora=True).scale == 8.0
    assert math.isclose(LoRALinear(base, r=3, alpha=1, rslora=True).scale, 1 / math.sqrt(3))


def test_init_is_kaiming_uniform_and_zero_b():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(300, 7), r=64, alpha=8)
    a = layer.lora_A.weight
    # kaiming_uniform(a=sqrt(5)) on fan_in=300 draws from U(-1/sqrt(300), 1/sqrt(300))
    bound = 1 / math.sqrt(300)
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_adapter_fp32_branch_in_input_dtype(dtype):
    layer = LoRALinear(nn.Linear(6, 5, dtype=dtype), r=2, alpha=4)
    assert layer.lora_A.weight.dtype == torch.float32
    assert layer.lora_B.weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(3, 6, dtype=dtype)
    assert layer.lora_branch(x).dtype == dtype
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32
    bf = LoRALinear(nn.Linear(6, 5), r=2, adapter_dtype=torch.bfloat16)
    assert bf.lora_A.weight.dtype == torch.bfloat16


@settings(max_examples=15, deadline=None)
@given(layer_cases)
def test_gradients_match_hand_derived(case):
    # float64 throughout, so the comparison is about the formulas, not fp32 rounding
    case = dict(case, dtype=torch.float64)
    layer, x = make_layer(case, adapter_dtype=torch.float64)
    x = x.reshape(-1, case["n_in"]).requires_grad_(True)  # X (N, in)
    y = layer(x)
    g = torch.randn_like(y)  # G (N, out), upstream gradient
    y.backward(g)
    a, b, s = layer.lora_A.weight.detach(), layer.lora_B.weight.detach(), layer.scale
    # y = X W^T + s X A^T B^T  =>  dL/dB = s G^T (X A^T),  dL/dA = s (G B)^T X
    torch.testing.assert_close(layer.lora_B.weight.grad, s * g.t() @ (x.detach() @ a.t()),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(layer.lora_A.weight.grad, s * (g @ b).t() @ x.detach(),
                               rtol=1e-10, atol=1e-10)
    w = layer.base_layer.weight.detach()
    torch.testing.assert_close(x.grad, g @ w + s * g @ b @ a, rtol=1e-10, atol=1e-10)


def test_dropout_applies_only_to_branch():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(8, 16)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # a fresh mask each call
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.lora_branch(x))


def test_enabled_switch_and_merged_disabled_give_base():
    layer = LoRALinear(nn.Linear(5, 3), r=2, alpha=2)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(4, 5)
    base_out = layer.base_layer(x)
    assert not torch.allclose(layer(x), base_out)
    layer.enabled = False
    assert torch.equal(layer(x), base_out)
    layer.enabled = True
    adapted = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), adapted)  # merged: branch not added a second time
    layer.enabled = False
    torch.testing.assert_close(layer(x), base_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train", [True, False])
def test_merged_and_disabled_gives_base_with_dropout(train):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 12), r=4, alpha=8, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(6, 16)
    base_out = layer.base_layer(x)
    layer.merge()
    layer.train(train)
    layer.enabled = False
    torch.testing.assert_close(layer(x), base_out, rtol=1e-5, atol=1e-5)
    layer.enabled = True  # merged and enabled: the full update, no dropout either
    torch.testing.assert_close(layer(x), base_out + x @ layer.delta_weight().t(), rtol=1e-5, atol=1e-5)


def test_merge_is_idempotent():
    layer = LoRALinear(nn.Linear(5, 3), r=2)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    layer.merge()
    w = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base_layer.weight, w)


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "r=0"), ({"r": -2}, "r=-2"), ({"r": 2.5}, "r=2.5"),
    ({"alpha": 0}, "alpha=0"), ({"alpha": -1.0}, "alpha=-1.0"),
    ({"alpha": float("inf")}, "positive finite number, got alpha=inf"),
    ({"alpha": float("nan")}, "positive finite number, got alpha=nan"),
    ({"alpha": -float("inf")}, "alpha=-inf"), ({"alpha": True}, "alpha=True"),
    ({"dropout": 1.0}, r"dropout=1.0"), ({"dropout": -0.1}, r"dropout=-0.1")])
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(4, 4), **kwargs)
    with pytest.raises(ValueError, match=match):
        lora_wrap(Tiny(), **kwargs)


def test_numpy_settings_become_plain_python_numbers(tmp_path):
    # the rules are the shared validators' (any integral rank, any real alpha and dropout); the
    # values are stored as Python numbers, so the saved adapter_config.json can be written
    np = pytest.importorskip("numpy")
    layer = LoRALinear(nn.Linear(4, 4), r=np.int64(2), alpha=np.float32(8), dropout=np.float32(0.25))
    assert (type(layer.r), type(layer.alpha), layer.r, layer.alpha) == (int, float, 2, 8.0)
    assert layer.scale == 4.0 and layer.lora_dropout.p == 0.25
    model = lora_wrap(Tiny(), r=np.int32(4), alpha=np.int64(16), dropout=np.float64(0.0))
    settings = model._minift_lora
    assert [(type(settings[k]), settings[k]) for k in ("r", "alpha", "dropout")] == \
        [(int, 4), (int, 16), (float, 0.0)]
    minift.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 16)


def test_wrapping_a_non_linear_raises():
    with pytest.raises(TypeError, match="Conv1d"):
        LoRALinear(nn.Conv1d(2, 2, 1))


# ---- model surgery ---------------------------------------------------------------------------

def wrapped_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@pytest.mark.parametrize("targets, expected", [
    ("all-linear", [f"layers.{i}.{p}" for i in range(2) for p in ("q_proj", "v_proj", "xq_proj")]),
    (["q_proj"], ["layers.0.q_proj", "layers.1.q_proj"]),
    (("v_proj", "layers.0.q_proj"), ["layers.0.q_proj", "layers.0.v_proj", "layers.1.v_proj"]),
    (r"layers\.1\..*q_proj", ["layers.1.q_proj", "layers.1.xq_proj"]),
    (["lm_head"], ["lm_head"]),
])
def test_target_module_forms(targets, expected):
    model = lora_wrap(Tiny(), r=2, target_modules=targets)
    assert wrapped_names(model) == expected
    assert find_targets(Tiny(), targets) == expected


def test_wrap_freezes_all_but_lora_and_keeps_output():
    model = Tiny()
    ids = torch.randint(0, 11, (2, 5))
    before = model(ids)
    lora_wrap(model, r=2)
    assert torch.equal(model(ids), before)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    assert grads and all(g == ("lora_" in n) for n, g in grads.items())
    assert any(grads.values())
    model(ids).sum().backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    assert "layers.0.q_proj.base_layer.weight" in dict(model.named_parameters())
    assert model._minift_lora["r"] == 2


# Random module trees: nested ModuleDicts whose leaves are Linear / LayerNorm / Embedding layers,
# names drawn from a few HF-like words so that suffixes repeat across branches.
TREE_NAMES = ["q_proj", "v_proj", "up", "down", "norm", "head", "block", "attn"]
tree_leaves = st.one_of(
    st.tuples(st.just("linear"), st.integers(1, 6), st.integers(1, 6), st.booleans()),
    st.tuples(st.just("norm"), st.integers(1, 6)),
    st.tuples(st.just("embedding"), st.integers(1, 6), st.integers(1, 6)))
trees = st.recursive(tree_leaves, lambda kids: st.dictionaries(st.sampled_from(TREE_NAMES), kids, min_size=1,
                                                                max_size=3), max_leaves=12)


def build_tree(spec, frozen):
    if isinstance(spec, dict):
        return nn.ModuleDict({name: build_tree(child, frozen) for name, child in spec.items()})
    kind, *args = spec
    module = {"linear": lambda i, o, b: nn.Linear(i, o, bias=b), "norm": nn.LayerNorm,
              "embedding": nn.Embedding}[kind](*args)
    for p in module.parameters():  # some parameters arrive frozen already
        p.requires_grad_(not frozen.draw(st.booleans()))
    return module


def _ends_with(name, suffix):
    return name == suffix or name.endswith("." + suffix)


@settings(max_examples=40, deadline=None)
@given(tree=trees, r=st.integers(1, 4), data=st.data())
def test_only_lora_parameters_train_on_any_tree(tree, r, data):
    model = nn.ModuleDict({"body": build_tree(tree, data), "out_proj": nn.Linear(3, 2)})
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in linear})
    form = data.draw(st.sampled_from(["all-linear", "list", "regex"]))
    if form == "all-linear":
        exclude = tuple(data.draw(st.lists(st.sampled_from(suffixes), unique=True)))
        kwargs = dict(target_modules="all-linear", exclude=exclude)
        expected = [n for n in linear if not any(_ends_with(n, s) for s in exclude)]
    elif form == "list":
        chosen = data.draw(st.lists(st.sampled_from(suffixes), min_size=1, unique=True))
        kwargs = dict(target_modules=chosen)
        expected = [n for n in linear if any(_ends_with(n, s) for s in chosen)]
    else:
        pattern = r".*\." + re.escape(data.draw(st.sampled_from(suffixes)))
        kwargs = dict(target_modules=pattern)
        expected = [n for n in linear if re.fullmatch(pattern, n)]
    if not expected:
        with pytest.raises(ValueError, match="matches no linear layer"):
            lora_wrap(model, r=r, **kwargs)
        return
    shapes = {n: (model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in expected}
    lora_wrap(model, r=r, **kwargs)
    assert wrapped_names(model) == expected
    params = dict(model.named_parameters())
    assert all(p.requires_grad == ("lora_" in n) for n, p in params.items())
    lora = {n: tuple(p.shape) for n, p in params.items() if "lora_" in n}
    assert lora == {**{f"{n}.lora_A.weight": (r, i) for n, (i, o) in shapes.items()},
                    **{f"{n}.lora_B.weight": (o, r) for n, (i, o) in shapes.items()}}
    assert minift.trainable_parameters(model)[0] == sum(r * (i + o) for i, o in shapes.values())


def test_exclude_and_string_exclude():
    model = lora_wrap(Tiny(), r=2, exclude=("lm_head", "v_proj"))
    assert all(not n.endswith("v_proj") for n in wrapped_names(model))
    model = lora_wrap(Tiny(), r=2, exclude="q_proj")
    names = wrapped_names(model)
    assert "lm_head" in names and "layers.0.xq_proj" in names and "layers.0.q_proj" not in names


def test_nothing_matches_lists_available_layers():
    with pytest.raises(ValueError, match=r"match no linear layer.*layers\.0\.q_proj.*lm_head"):
        lora_wrap(Tiny(), target_modules=["k_proj"])
    with pytest.raises(ValueError, match=r"k_proj.*available"):
        lora_wrap(Tiny(), target_modules=r"k_proj")
    with pytest.raises(ValueError, match=r"\['norm'\] match no linear layer"):
        lora_wrap(Tiny(), target_modules=["q_proj", "norm"])  # not a linear layer
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora_wrap(nn.Sequential(nn.ReLU()))


def test_bad_target_modules_types():
    with pytest.raises(ValueError, match="not a valid regex"):
        lora_wrap(Tiny(), target_modules="q_proj(")
    with pytest.raises(TypeError, match="target_modules"):
        lora_wrap(Tiny(), target_modules=3)
    with pytest.raises(TypeError, match="target_modules"):
        lora_wrap(Tiny(), target_modules=[])
    with pytest.raises(TypeError, match="non-empty strings"):
        lora_wrap(Tiny(), target_modules=["q_proj", 4])


def test_wrapping_twice_raises():
    model = lora_wrap(Tiny(), r=2)
    with pytest.raises(ValueError, match="already LoRA-wrapped"):
        lora_wrap(model, r=2)


def test_disable_adapters_gives_base_and_restores_on_error():
    model = Tiny()
    ids = torch.randint(0, 11, (2, 5))
    base_out = model(ids)
    lora_wrap(model, r=2)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    adapted = model(ids)
    assert not torch.allclose(adapted, base_out)
    with minift.disable_adapters(model) as same:
        assert same is model
        assert torch.equal(model(ids), base_out)
    assert torch.equal(model(ids), adapted)
    model.layers[0]["q_proj"].enabled = False  # a layer switched off before stays off
    partly = model(ids)
    with pytest.raises(RuntimeError, match="inside"):
        with minift.disable_adapters(model):
            raise RuntimeError("inside")
    assert torch.equal(model(ids), partly)
    assert model.layers[0]["q_proj"].enabled is False and model.layers[1]["q_proj"].enabled
    with pytest.raises(ValueError, match="no LoRALinear"):
        with minift.disable_adapters(Tiny()):
            pass


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_lora_replaces_with_plain_linear(dtype):
    model = Tiny().to(dtype)
    ids = torch.randint(0, 11, (2, 5))
    lora_wrap(model, r=3, alpha=5, target_modules="all-linear", exclude=())
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.1)
    adapted = model(ids).float()
    expected_w = (model.layers[0]["q_proj"].base_layer.weight.float()
                  + model.layers[0]["q_proj"].delta_weight()).to(dtype)
    bias = model.layers[0]["q_proj"].base_layer.bias
    assert merge_lora(model) is model
    assert not wrapped_names(model) and not hasattr(model, "_minift_lora")
    q = model.layers[0]["q_proj"]
    assert type(q) is nn.Linear and q.weight.dtype == dtype and q.bias is bias
    assert torch.equal(q.weight, expected_w)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(model(ids).float(), adapted, rtol=tol, atol=tol)
    assert lora_state_dict(model) == {}
    with pytest.raises(ValueError, match="no LoRALinear"):
        merge_lora(model)
    lora_wrap(model, r=2)  # a merged model can take a fresh adapter


def test_trainable_parameters_and_summary():
    model = Tiny(d=8, vocab=11)
    total = sum(p.numel() for p in model.parameters())
    assert minift.trainable_parameters(model) == (total, total)
    lora_wrap(model, r=2, target_modules=["q_proj", "v_proj"])
    lora = 4 * (2 * 8 + 8 * 2)  # four layers, A (2, 8) + B (8, 2)
    assert minift.trainable_parameters(model) == (lora, total + lora)
    pct = 100 * lora / (total + lora)
    assert minift.trainable_summary(model) == (
        f"trainable params: {lora:,} || all params: {total + lora:,} || trainable%: {pct:.4f}")
    assert minift.trainable_summary(nn.Sequential()) == (
        "trainable params: 0 || all params: 0 || trainable%: 0.0000")


def test_lora_state_dict_holds_only_adapters():
    model = lora_wrap(Tiny(), r=2, target_modules=["v_proj"])
    sd = lora_state_dict(model)
    assert sorted(sd) == [f"layers.{i}.v_proj.lora_{m}.weight" for i in range(2) for m in "AB"]
    assert sd["layers.0.v_proj.lora_A.weight"].shape == (2, 8)
    assert sd["layers.0.v_proj.lora_B.weight"].shape == (8, 2)


# ---- NF4 bases (QLoRA) -----------------------------------------------------------------------

def quantized_tiny(compute_dtype=None):
    from minift.nf4.linear import quantize_model
    return quantize_model(Tiny(d=16, vocab=11), compute_dtype=compute_dtype)


def test_all_linear_wraps_nf4_layers_and_starts_at_base():
    from minift.nf4.linear import NF4Linear
    model = quantized_tiny(torch.float32)
    ids = torch.randint(0, 11, (2, 5))
    before = model(ids)
    lora_wrap(model, r=4)
    assert len(wrapped_names(model)) == 6
    assert all(isinstance(m.base_layer, NF4Linear) for m in model.modules()
               if isinstance(m, LoRALinear))
    assert torch.equal(model(ids), before)
    model(ids).sum().backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())
    assert not any(b.requires_grad for b in model.buffers())


def test_nf4_counts_match_unquantized_counts():
    plain, quant = Tiny(d=16, vocab=11), quantized_tiny()
    assert minift.trainable_parameters(quant)[1] == minift.trainable_parameters(plain)[1]
    lora_wrap(plain, r=4)
    lora_wrap(quant, r=4)
    assert minift.trainable_parameters(quant) == minift.trainable_parameters(plain)


@pytest.mark.parametrize("compute_dtype", [None, torch.float32])
def test_merge_lora_dequantizes_nf4(compute_dtype):
    from minift.nf4.linear import NF4Linear
    torch.manual_seed(0)
    nf4 = NF4Linear.from_linear(nn.Linear(32, 8), compute_dtype=compute_dtype)
    model = lora_wrap(nn.Sequential(nn.Identity(), nf4), r=2, alpha=4)
    layer = model[1]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    with pytest.raises(TypeError, match="merge_lora"):
        layer.merge()
    dtype = compute_dtype or torch.bfloat16
    expected = (nf4.dequantize(dtype).float() + layer.delta_weight()).to(dtype)
    x = torch.randn(3, 32, dtype=dtype)
    adapted = model(x)
    merge_lora(model)
    assert type(model[1]) is nn.Linear and model[1].weight.dtype == dtype
    assert torch.equal(model[1].weight, expected)
    assert torch.equal(model[1].bias, nf4.bias.to(dtype))
    tol = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(model(x), adapted, rtol=tol, atol=tol)
