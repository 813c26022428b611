"""Checkpoints: atomic writes, pruning, 'latest', exact resume, and refusing the wrong checkpoint."""
import json
import os

import pytest
import torch
from test_trainer import TinyLM, make_examples, tiny_llama

import minift.checkpoints.steps as ckpt
from minift.training.config import TrainConfig
from minift.training.loop import train
from minift.training.setup import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def cfg(out, **kw):
    base = dict(method="full", learning_rate=3e-2, warmup_ratio=0.25, micro_batch_size=4,
                bf16=False, progress=False, output_dir=str(out), keep_last=None)
    base.update(kw)
    return TrainConfig(**base)


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _saved_model(out, step=1, **model_kw):
    model = TinyLM(**model_kw)
    optimizer = make_optimizer(model, cfg(out))
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    optimizer.step()
    path = ckpt.save_checkpoint(out, step, model=model, optimizer=optimizer, method="full",
                                trainer_state={"config": {}})
    return model, optimizer, path


# ---- resume equivalence ------------------------------------------------------------------
def _crash_then_resume(tmp_path, optimizer, **kw):
    data = make_examples(40, seed=7)  # 10 micro-batches an epoch; grad_accum 3 -> 4 steps an epoch
    settings = dict(max_steps=8, grad_accum=3, save_interval=3, neftune_alpha=2.0,
                    optimizer=optimizer, **kw)
    whole = TinyLM(dim=128)  # embedding and mix have >= 4096 elements: 8-bit optimizer state
    state0 = {k: v.clone() for k, v in whole.state_dict().items()}
    train(whole, data, cfg(tmp_path / "whole", **settings))

    # Same start; a crash in step 5's first forward (after the step-3 checkpoint) ends the run.
    broken = TinyLM(dim=128, crash_at_call=4 * 3 + 1)
    broken.load_state_dict(state0)
    with pytest.raises(KeyboardInterrupt):
        train(broken, data, cfg(tmp_path / "part", **settings))
    assert [p.rsplit("/", 1)[1] for _, p in ckpt.list_checkpoints(tmp_path / "part")] == ["step-3"]

    resumed = TinyLM(dim=128)  # fresh weights: everything must come from the checkpoint
    summary = train(resumed, data, cfg(tmp_path / "part", resume_from="latest", **settings))
    return whole, resumed, summary


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_resume_gives_identical_losses(tmp_path, optimizer):
    whole, resumed, summary = _crash_then_resume(tmp_path, optimizer)
    saved = ckpt.load_file(summary["checkpoint"] + "/optimizer.safetensors")
    assert any(k.endswith("exp_avg_codes") for k in saved) == (optimizer != "adamw")
    # the crashed run logged step 4; the resume dropped it and re-ran it
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 8
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert summary["steps"] == 8 and summary["resumed_from"].endswith("step-3")
    assert summary["first_loss"] == losses(tmp_path / "whole")[0]


def _qlora_llama(adapter_seed, crash_at_call=None):
    """A QLoRA tiny Llama whose frozen base is always the same (seed 0); its adapters are drawn
    with `adapter_seed`. lora_A/lora_B of the MLP have 4096 elements: 8-bit optimizer states."""
    from minift.lora.layer import lora_wrap
    from minift.nf4.linear import quantize_model

    torch.manual_seed(0)
    base = tiny_llama(hidden=128, intermediate=256)
    torch.nn.init.normal_(base.lm_head.weight, std=1.0)
    torch.manual_seed(adapter_seed)
    model = lora_wrap(quantize_model(base), r=32, alpha=32, dropout=0.1)
    if crash_at_call is not None:  # a crash inside the n-th training forward
        calls = []

        def maybe_crash(module, args):
            if module.training:
                calls.append(1)
                if len(calls) == crash_at_call:
                    raise KeyboardInterrupt("simulated crash")

        model.register_forward_pre_hook(maybe_crash)
    return model


def test_qlora_paged_adamw8bit_checkpointing_resume_gives_identical_losses(tmp_path):
    data = make_examples(40, vocab=64, seed=7)  # 10 micro-batches an epoch; 4 steps an epoch
    settings = dict(method="qlora", optimizer="paged_adamw8bit", gradient_checkpointing=True,
                    learning_rate=1e-2, max_steps=8, grad_accum=3, save_interval=3, neftune_alpha=2.0)
    whole = _qlora_llama(adapter_seed=1)
    train(whole, data, cfg(tmp_path / "whole", **settings))
    with pytest.raises(KeyboardInterrupt):  # in step 5's first forward, after the step-3 checkpoint
        train(_qlora_llama(adapter_seed=1, crash_at_call=4 * 3 + 1), data, cfg(tmp_path / "part", **settings))
    resumed = _qlora_llama(adapter_seed=2)  # other adapters: they must come from the checkpoint
    summary = train(resumed, data, cfg(tmp_path / "part", resume_from="latest", **settings))
    saved = ckpt.load_file(summary["checkpoint"] + "/optimizer.safetensors")
    assert any(k.endswith("exp_avg_codes") for k in saved)  # 8-bit states were saved and restored
    assert losses(tmp_path / "part") == losses(tmp_path / "whole")
    assert len(losses(tmp_path / "whole")) == 8
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert summary["resumed_from"].endswith("step-3")


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_resume_refuses_another_base_with_the_same_shapes(tmp_path, method):
    from minift.lora.layer import lora_wrap
    from minift.nf4.linear import quantize_model

    def model(scale=1.0):
        torch.manual_seed(0)
        base = tiny_llama()
        with torch.no_grad():
            for p in base.parameters():
                p.mul_(scale)
        return lora_wrap(quantize_model(base) if method == "qlora" else base, r=4, alpha=8)

    data = make_examples(16, vocab=64)
    train(model(), data, cfg(tmp_path, method=method, max_steps=2))
    with pytest.raises(ValueError, match=r"step-2: checkpoint was trained on a different base model: "
                                         r"frozen tensor 'model.embed_tokens.weight' differs"):
        train(model(0.5), data, cfg(tmp_path, method=method, max_steps=3, resume_from="latest"))
    summary = train(model(), data, cfg(tmp_path, method=method, max_steps=3, resume_from="latest"))
    assert summary["steps"] == 3 and summary["resumed_from"].endswith("step-2")


def test_base_fingerprint_tolerates_summation_order_not_other_weights():
    model = tiny_llama().requires_grad_(False)
    saved = ckpt.base_fingerprint(model)
    assert set(saved) == {n for n, _ in model.named_parameters()}
    # the same values summed in float64 in another order differ by far less than BASE_RTOL
    name, (numel, total, squares) = next(iter(saved.items()))
    nudged = dict(saved, **{name: [numel, total * (1 + 1e-12), squares * (1 - 1e-12)]})
    assert ckpt._base_difference(saved, nudged) is None
    torch.manual_seed(1)
    other = ckpt.base_fingerprint(tiny_llama().requires_grad_(False))  # same init std, other draw
    assert "differs" in ckpt._base_difference(saved, other)
    with torch.no_grad():
        model.model.norm.weight.add_(1e-3)  # a small change to one tensor is named
    assert "'model.norm.weight' differs" in ckpt._base_difference(saved, ckpt.base_fingerprint(model))


def test_resume_rejects_another_method(tmp_path):
    from minift.lora.layer import lora_wrap

    train(TinyLM(), make_examples(8), cfg(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match="method 'full'.*method 'lora'"):
        train(lora_wrap(TinyLM(), r=2), make_examples(8),
              cfg(tmp_path, method="lora", resume_from="latest"))


def test_resume_rejects_another_model_shape(tmp_path):
    train(TinyLM(dim=16), make_examples(8), cfg(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"different model.*mix.weight: shape \[16, 16\] in the "
                                         r"checkpoint, \[8, 8\] in the model"):
        train(TinyLM(dim=8), make_examples(8), cfg(tmp_path, resume_from="latest"))


def test_resume_rejects_changed_data_order_or_data(tmp_path):
    train(TinyLM(), make_examples(8), cfg(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"micro_batch_size \(4 -> 2\)"):
        train(TinyLM(), make_examples(8), cfg(tmp_path, micro_batch_size=2, resume_from="latest"))
    with pytest.raises(ValueError, match="train_data differs"):
        train(TinyLM(), make_examples(8, seed=9), cfg(tmp_path, resume_from="latest"))


def test_resume_latest_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
        train(TinyLM(), make_examples(8), cfg(tmp_path, resume_from="latest"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(TinyLM(), make_examples(8), cfg(tmp_path, resume_from=str(tmp_path / "nowhere")))


# ---- atomic writes and pruning -----------------------------------------------------------
def test_crash_mid_save_leaves_previous_checkpoint_whole(tmp_path, monkeypatch):
    model, optimizer, good = _saved_model(tmp_path, step=1)
    real = ckpt.write_json

    def dies_at_manifest(path, obj, **kwargs):  # the process is killed just before the manifest
        if path.name == ckpt.MANIFEST:
            raise KeyboardInterrupt("killed")
        real(path, obj, **kwargs)

    monkeypatch.setattr(ckpt, "write_json", dies_at_manifest)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, method="full",
                             trainer_state={})
    monkeypatch.setattr(ckpt, "write_json", real)
    assert (tmp_path / ".tmp-step-2" / "model.safetensors").exists()
    assert not (tmp_path / "step-2").exists()
    # A directory that looks like a checkpoint but has no manifest is not one either.
    (tmp_path / "step-5").mkdir()
    (tmp_path / "step-5" / "model.safetensors").write_bytes(b"half")
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.resolve_checkpoint("latest", tmp_path) == good

    fresh = TinyLM()
    ckpt.load_checkpoint(good, model=fresh, optimizer=make_optimizer(fresh, cfg(tmp_path)))
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.warns(UserWarning, match=r"step-5 has no manifest.json.*moved aside to unrecognized-step-5"):
        ckpt.save_checkpoint(tmp_path, 3, model=model, optimizer=optimizer, method="full", trainer_state={})
    assert not (tmp_path / ".tmp-step-2").exists()  # the next save clears leftovers


def test_complete_temp_directory_is_promoted_not_lost(tmp_path):
    model, optimizer, good = _saved_model(tmp_path, step=1)
    os.rename(good, tmp_path / ".old-step-1")  # crash between the two renames of a re-save
    (tmp_path / ".tmp-step-2").mkdir()  # crash before anything of step 2 was written
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.clean_incomplete(tmp_path) == [str(tmp_path / ".tmp-step-2")]
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_truncated_file_makes_checkpoint_incomplete(tmp_path):
    _, _, path = _saved_model(tmp_path)
    assert ckpt.is_complete(path)
    with open(os.path.join(path, "optimizer.safetensors"), "r+b") as f:
        f.truncate(10)
    assert not ckpt.is_complete(path) and ckpt.latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(path, model=TinyLM(), optimizer=None)


def test_keep_last_prunes_old_checkpoints(tmp_path):
    train(TinyLM(), make_examples(20), cfg(tmp_path, save_interval=1, keep_last=2))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 5]
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "step-4", "step-5", "summary.json"]


def test_optimizer_state_round_trips_exactly(tmp_path):
    model, optimizer, path = _saved_model(tmp_path)
    other = TinyLM()
    other_opt = make_optimizer(other, cfg(tmp_path))
    ckpt.load_checkpoint(path, model=other, optimizer=other_opt)
    a, b = optimizer.state_dict(), other_opt.state_dict()
    assert a["param_groups"] == [dict(g, betas=list(g["betas"])) for g in b["param_groups"]] or \
        json.dumps(a["param_groups"]) == json.dumps(b["param_groups"])
    for idx, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][idx][key]), (idx, key)


def test_rng_states_are_restored(tmp_path):
    import random

    import numpy as np

    _, _, path = _saved_model(tmp_path)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(2)  # move every generator on
    state_tensors, state_meta = ckpt.rng_state()
    ckpt.set_rng_state(ckpt.load_file(path + "/rng.safetensors"), ckpt.read_trainer_state(path)["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert state_tensors["torch"].dtype == torch.uint8 and len(state_meta["python"][1]) == 625


def test_tied_embeddings_save_once_and_load_back(tmp_path):
    from minift.models.config import ModelConfig
    from minift.models.llama import Llama

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=32, tie_word_embeddings=True)
    model = Llama(config)
    opt = make_optimizer(model, cfg(tmp_path))
    path = ckpt.save_checkpoint(tmp_path, 1, model=model, optimizer=opt, method="full", trainer_state={})
    assert "lm_head.weight" not in ckpt.load_file(path + "/model.safetensors")
    other = Llama(config)
    ckpt.load_checkpoint(path, model=other, optimizer=make_optimizer(other, cfg(tmp_path)))
    assert torch.equal(other.lm_head.weight, model.model.embed_tokens.weight)
    assert other.lm_head.weight is other.model.embed_tokens.weight
