"""minift.AdamW8bit: state format, bad input, resume, NaN policy, bf16 and quality."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import minift
from minift.optim.adamw8bit import VERSION_KEY, AdamW8bit, PagedAdamW8bit


def _state_bytes(opt, p):
    return sum(v.nbytes for v in opt.state[p].values() if torch.is_tensor(v))


def test_state_bytes_per_parameter():
    big = torch.nn.Parameter(torch.randn(512, 512))
    small = torch.nn.Parameter(torch.randn(50, 60))  # 3000 < 4096 elements
    opt = minift.AdamW8bit([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert _state_bytes(opt, big) / big.numel() <= 2.04
    assert _state_bytes(opt, big) / big.numel() == pytest.approx(2 + 8 / 256)
    assert _state_bytes(opt, small) / small.numel() == 8
    assert opt.state[big]["exp_avg_codes"].dtype == torch.uint8
    assert isinstance(minift.PagedAdamW8bit([big]), minift.AdamW8bit)
    assert PagedAdamW8bit([big]).paged


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(page_size=1000), "page_size"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], **kwargs)


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=NAN), r"\(defaults\): lr must be a finite number >= 0, got nan"),
    (dict(lr=INF), r"\(defaults\): lr must be a finite number >= 0, got inf"),
    (dict(eps=NAN), r"\(defaults\): eps must be a finite number > 0, got nan"),
    (dict(eps=INF), r"\(defaults\): eps must be a finite number > 0, got inf"),
    (dict(weight_decay=NAN), r"\(defaults\): weight_decay must be a finite number >= 0, got nan"),
    (dict(weight_decay=-INF), r"\(defaults\): weight_decay must be a finite number >= 0, got -inf"),
    (dict(betas=(NAN, 0.999)), r"\(defaults\): betas\[0\] must be a finite number in \[0, 1\), got nan"),
    (dict(betas=(0.9, NAN)), r"\(defaults\): betas\[1\] must be a finite number in \[0, 1\), got nan"),
    (dict(device_budget_bytes=NAN), "device_budget_bytes must be a finite number >= 0 or None, got nan"),
])
def test_non_finite_hyperparameters_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_non_finite_value_in_a_param_group_names_the_group():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(param group 1\): lr must be a finite number >= 0, got nan"):
        AdamW8bit([{"params": [a]}, {"params": [b], "lr": NAN}])


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=True), "lr must be a finite number >= 0, got bool True"),
    (dict(eps=True), "eps must be a finite number > 0, got bool True"),
    (dict(weight_decay=False), "weight_decay must be a finite number >= 0, got bool False"),
    (dict(betas=(0.9, True)), r"betas\[1\] must be a finite number in \[0, 1\), got bool True"),
    (dict(lr="1e-3"), "lr must be a finite number >= 0, got str '1e-3'"),
    (dict(lr=None), "lr must be a finite number >= 0, got NoneType None"),
])
def test_bool_and_non_number_hyperparameters_are_type_errors(kwargs, match):
    with pytest.raises(TypeError, match=match):
        AdamW8bit([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_numpy_scalars_are_accepted_as_hyperparameters():
    np = pytest.importorskip("numpy")
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW8bit([p], lr=np.float32(0.1), betas=(np.float64(0.9), 0.999), eps=np.float32(1e-8))
    p.grad = torch.ones(3)
    opt.step()
    assert torch.all(p < 1)


@pytest.mark.parametrize("key,value,error,match", [
    ("lr", -1.0, ValueError, r"\(param group 1\): lr must be a finite number >= 0, got -1.0"),
    ("lr", NAN, ValueError, r"\(param group 1\): lr must be a finite number >= 0, got nan"),
    ("lr", True, TypeError, r"\(param group 1\): lr must be a finite number >= 0, got bool True"),
    ("eps", 0.0, ValueError, r"\(param group 1\): eps must be a finite number > 0, got 0.0"),
    ("weight_decay", INF, ValueError, r"\(param group 1\): weight_decay must be a finite number"),
    ("betas", (0.9, 1.0), ValueError, r"\(param group 1\): betas\[1\] must be a finite number in \[0, 1\)"),
])
def test_add_param_group_checks_hyperparameters_before_adding(key, value, error, match):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamW8bit([a], lr=0.1)
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": [b], key: value})
    assert len(opt.param_groups) == 1  # the refused group was not added
    opt.add_param_group({"params": [b], "lr": 0.2})
    assert opt.param_groups[1]["lr"] == 0.2 and opt.param_groups[1]["eps"] == 1e-8


def test_step_does_not_recheck_hyperparameters(monkeypatch):
    # checked on construction, add_param_group and load_state_dict; a step only reads them
    import minift.optim.adamw8bit as module
    import minift.optim.adamw8bit_state as state_module

    calls = []
    check = module._check_hparams
    monkeypatch.setattr(module, "_check_hparams", lambda *a: calls.append(a) or check(*a))
    monkeypatch.setattr(state_module, "check_hparams", lambda *a: calls.append(a) or check(*a))
    ps, opt = _model_and_opt()
    assert len(calls) == 2  # the defaults and the one group
    for i in range(3):
        _grads(ps, i)
        opt.step()
    assert len(calls) == 2
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert len(calls) == 3  # the saved group


def test_scheduler_written_learning_rates_are_accepted():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdamW8bit([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 4)
    assert torch.isfinite(p).all()


def _saved_state(**kw):
    ps, opt = _model_and_opt(**kw)
    _grads(ps, 0)
    opt.step()
    return ps, opt, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("index,key,value,match", [
    (0, "step", -1, r"state\[0\]\['step'\] must be an integer >= 0, got -1"),
    (0, "step", 1.5, r"state\[0\]\['step'\] must be an integer >= 0, got float 1.5"),
    (1, "step", "3", r"state\[1\]\['step'\] must be an integer >= 0, got str '3'"),
    (1, "step", True, r"state\[1\]\['step'\] must be an integer >= 0, got bool"),
    (0, "step", torch.tensor(2.0), r"state\[0\]\['step'\] must be an integer"),
])
def test_load_rejects_bad_step(index, key, value, match):
    _, opt, sd = _saved_state()
    sd["state"][index][key] = value
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)


def test_load_accepts_an_integer_tensor_step():
    _, opt, sd = _saved_state()
    sd["state"][0]["step"] = torch.tensor(1)
    opt.load_state_dict(sd)
    assert opt.state_dict()["state"][0]["step"] == 1 and isinstance(opt.state[
        opt.param_groups[0]["params"][0]]["step"], int)


@pytest.mark.parametrize("index,key,bad,match", [
    (0, "exp_avg_absmax", NAN, "NaN or Inf"),
    (0, "exp_avg_sq_absmax", INF, "NaN or Inf"),
    (0, "exp_avg_absmax", -1.0, "negative"),
    (1, "exp_avg", NAN, "NaN or Inf"),
    (1, "exp_avg_sq", -INF, "NaN or Inf"),
    (1, "exp_avg_sq", -0.5, "negative"),
])
def test_load_rejects_non_finite_or_negative_states(index, key, bad, match):
    ps, opt, sd = _saved_state()
    sd["state"][index][key][0] = bad
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match=rf"state\[{index}\]\['{key}'\] holds {match}"):
        opt.load_state_dict(sd)
    _grads(ps, 1)
    opt.step()  # the optimizer kept its own, finite states
    assert all(torch.isfinite(p.float()).all() for p in ps)
    assert not all(torch.equal(a, b) for a, b in zip(ps, before))


def test_load_rejects_bad_saved_hyperparameters():
    _, opt, sd = _saved_state()
    sd["param_groups"][0]["lr"] = NAN
    with pytest.raises(ValueError, match=r"\(saved param_groups\[0\]\): lr must be a finite number"):
        opt.load_state_dict(sd)


def test_bad_hyperparameter_in_param_group_names_the_group():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"param group 1.*eps"):
        AdamW8bit([{"params": [a]}, {"params": [b], "eps": -1.0}])


def test_sparse_gradient_is_rejected_with_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = AdamW8bit(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"sparse.*param_groups\[0\]\['params'\]\[0\]"):
        opt.step()


def _model_and_opt(**kw):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(70, 80)), torch.nn.Parameter(torch.randn(33)),
          torch.nn.Parameter(torch.randn(64, 96).to(torch.bfloat16))]
    return ps, AdamW8bit(ps, lr=1e-2, weight_decay=0.05, stochastic_rounding=True, **kw)


def _grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def test_resume_takes_the_identical_next_step():
    ps, opt = _model_and_opt()
    for i in range(3):
        _grads(ps, i)
        opt.step()
    saved_sd = copy.deepcopy(opt.state_dict())
    saved_ps = [p.detach().clone() for p in ps]
    for i in (3, 4):
        _grads(ps, i)
        opt.step()
    expected = [p.detach().clone() for p in ps]

    ps2, opt2 = _model_and_opt()
    with torch.no_grad():
        for p, s in zip(ps2, saved_ps):
            p.copy_(s)
    opt2.load_state_dict(saved_sd)
    assert opt2.state_dict()["state"][0]["step"] == 3
    for i in (3, 4):
        _grads(ps2, i)
        opt2.step()
    assert all(torch.equal(a, b) for a, b in zip(ps2, expected))
    assert torch.equal(opt2.state[ps2[0]]["exp_avg_codes"], opt.state[ps[0]]["exp_avg_codes"])


def test_state_dict_is_versioned():
    ps, opt = _model_and_opt()
    _grads(ps, 0)
    opt.step()
    sd = opt.state_dict()
    assert sd[VERSION_KEY] == 1
    assert set(sd["state"][0]) == {"step", "exp_avg_codes", "exp_avg_absmax",
                                   "exp_avg_sq_codes", "exp_avg_sq_absmax"}
    assert set(sd["state"][1]) == {"step", "exp_avg", "exp_avg_sq"}
    newer = dict(sd, **{VERSION_KEY: 2})
    with pytest.raises(ValueError, match=VERSION_KEY):
        opt.load_state_dict(newer)


def test_torch_adamw_state_dict_is_rejected():
    ps, opt = _model_and_opt()
    torch_opt = torch.optim.AdamW(ps)
    _grads(ps, 0)
    torch_opt.step()
    with pytest.raises(ValueError, match=VERSION_KEY):
        opt.load_state_dict(torch_opt.state_dict())


def test_mismatched_shapes_name_the_key():
    ps, opt = _model_and_opt()
    _grads(ps, 0)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["exp_avg_absmax"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg_absmax'\]"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg_sq"] = torch.zeros(34)
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg_sq'\]"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["exp_avg_sq_codes"]
    with pytest.raises(ValueError, match="exp_avg_sq_codes"):
        opt.load_state_dict(sd)
    other = AdamW8bit([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match=r"param_groups\[0\]"):
        other.load_state_dict(opt.state_dict())


def test_nonfinite_gradient_skips_the_step_and_keeps_states():
    ps, opt = _model_and_opt()
    _grads(ps, 0)
    opt.step()
    before_sd = copy.deepcopy(opt.state_dict())
    before_ps = [p.detach().clone() for p in ps]
    _grads(ps, 1)
    ps[0].grad[3, 4] = float("nan")
    ps[1].grad[0] = float("inf")
    with pytest.warns(RuntimeWarning, match=r"NaN/Inf.*#0 \(shape \(70, 80\)\), #1"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(ps, before_ps))
    after_sd = opt.state_dict()
    for i, st in before_sd["state"].items():
        for k, v in st.items():
            assert torch.equal(v, after_sd["state"][i][k]) if torch.is_tensor(v) else \
                v == after_sd["state"][i][k]
    _grads(ps, 2)
    opt.step()
    assert opt.state[ps[0]]["step"] == 2
    assert torch.isfinite(opt.state[ps[0]]["exp_avg_absmax"]).all()
    assert opt.state_dict()["skipped_steps"] == 1


def _host_reads(monkeypatch):
    """Count the Tensor calls that wait for the device (item, bool, tolist, cpu, ...)."""
    counts = []
    for name in ("item", "__bool__", "tolist", "cpu", "__int__", "__float__", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k:
                            counts.append(_n) or _r(self, *a, **k))
    return counts


@pytest.mark.parametrize("n_params", [2, 12])
def test_finite_check_reads_the_device_once_per_step(monkeypatch, n_params):
    ps = [torch.nn.Parameter(torch.randn(64, 80)) for _ in range(n_params)]
    opt = AdamW8bit(ps, lr=1e-2)
    _grads(ps, 0)
    opt.step()  # creates the states
    _grads(ps, 1)
    # the update itself is the kernel's on CUDA (no host reads); the CPU step it stands in for
    # here reads its map tables on the host, which is no sync on a CPU, so it is left out
    import minift.optim.adamw8bit as module

    updates = []
    monkeypatch.setattr(module, "_step8", lambda p, *a: updates.append(p))
    counts = _host_reads(monkeypatch)
    opt.step()
    assert counts == ["item"]  # one flag for all gradients (minift.tracing.known), not one read per tensor
    assert len(updates) == n_params
    monkeypatch.undo()
    ps[-1].grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match=rf"#{n_params - 1} \(shape \(64, 80\)\)"):
        opt.step()
    assert opt.skipped_steps == 1


def test_bf16_stochastic_rounding_keeps_small_updates():
    def run(stochastic):
        p = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        opt = AdamW8bit([p], lr=1e-3, stochastic_rounding=stochastic)
        for _ in range(20):
            p.grad = torch.ones_like(p)  # Adam moves each weight by ~lr per step
            opt.step()
        return p.float().mean().item()

    assert run(False) == 1.0  # 1 - 1e-3 rounds back to 1 in bf16 (spacing 2**-8 below 1)
    assert run(True) == pytest.approx(1 - 20 * 1e-3, abs=2e-3)


def test_eight_bit_tracks_fp32_adamw_closely():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(128, 64))
    ref = torch.nn.Parameter(p.detach().clone())
    opt, ref_opt = AdamW8bit([p], lr=1e-3), torch.optim.AdamW([ref], lr=1e-3, weight_decay=0.0)
    for i in range(5):
        g = torch.randn(128, 64)
        p.grad, ref.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    drift = (p - ref).abs().max().item()
    assert 0 < drift < 5 * 1e-3 * 0.1  # an update is ~lr; quantization shifts it by < 10%


def _quality_module():
    path = Path(__file__).resolve().parents[1] / "examples" / "optim_quality.py"
    spec = importlib.util.spec_from_file_location("optim_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_regression_loss_within_two_percent_of_torch_and_bnb_band():
    q = _quality_module()
    makers = q.optimizer_factories(3e-3, 0.01)
    final = {name: q.tail_mean(q.regression(make, steps=40)) for name, make in makers.items()}
    ours, ref = final["minift_adamw8bit"], final["torch_adamw"]
    assert abs(ours / ref - 1) < 0.02
    if "bnb_adamw8bit" in final:  # the oracle's own distance to fp32 AdamW sets the band
        bnb = final["bnb_adamw8bit"]
        band = max(abs(bnb / ref - 1), 0.005)
        assert abs(ours / bnb - 1) <= 2 * band


def _quality_ok(final: dict, name: str) -> bool:
    """The quality criterion: within 2% of fp32 torch AdamW's final loss and, when bitsandbytes
    is installed, within twice the oracle's own distance to torch AdamW (at least 0.5%) of the
    oracle's."""
    ours, ref = final[name], final["torch_adamw"]
    if not abs(ours / ref - 1) < 0.02:
        return False
    if "bnb_adamw8bit" in final:
        bnb = final["bnb_adamw8bit"]
        band = max(abs(bnb / ref - 1), 0.005)
        return abs(ours / bnb - 1) <= 2 * band
    return True


@pytest.fixture(scope="module")
def lm_problem():
    """examples/optim_quality.py's LM problem, fine-tune cut from 60 to 40 steps (~1 s each)."""
    q = _quality_module()
    # one thread, as the example runs: the summation order then does not depend on the core
    # count, and these small matmuls are faster without threading on a busy machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield q, q.pretrained_lm(seed=0, steps=30)
    finally:
        torch.set_num_threads(threads)


def _lm_final(q, base, make):
    return q.tail_mean(q.lm_finetune(make, steps=40, seed=0, base=base))


def test_lm_finetune_loss_within_two_percent_of_torch_and_bnb_band(lm_problem):
    q, base = lm_problem
    losses = {name: q.lm_finetune(make, steps=40, seed=0, base=base)
              for name, make in q.optimizer_factories(3e-3, 0.01).items()}
    final = {name: q.tail_mean(x) for name, x in losses.items()}
    # the fine-tune does learn (the loss falls well below its start), so agreement means something
    assert final["torch_adamw"] < 0.8 * losses["torch_adamw"][0]
    assert _quality_ok(final, "minift_adamw8bit"), final


@pytest.mark.parametrize("broken", [dict(betas=(0.0, 0.999)), dict(lr=6e-3)],
                         ids=["beta1=0", "lr x2"])
def test_lm_quality_criterion_catches_a_wrong_update(lm_problem, broken):
    # The criterion above must be able to fail: an optimizer that ignores momentum or takes
    # twice the step lands measurably elsewhere on the same problem.
    q, base = lm_problem
    makers = q.optimizer_factories(3e-3, 0.01)
    final = {name: _lm_final(q, base, makers[name]) for name in makers if name != "minift_adamw8bit"}
    kw = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    kw.update(broken)
    final["broken"] = _lm_final(q, base, lambda ps: AdamW8bit(ps, **kw))
    assert not _quality_ok(final, "broken"), final
