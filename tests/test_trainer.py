"""The training loop: config checks, loss normalisation, methods, checkpointing, resume, NaN."""
import json
import math
import random

import pytest
import torch
from torch import nn

import minift.checkpoints.steps as ckpt
from minift.objectives.loss import token_loss_sum
from minift.objectives.sft import accumulate_gradients
from minift.training.config import TrainConfig
from minift.training.loop import train
from minift.training.schedule import Schedule


# ---- shared helpers (test_checkpoint.py imports them too) ---------------------------------
class TinyLM(nn.Module):
    """A few-thousand-parameter causal LM with Llama's forward signature and module names.

    Causal mixing is a running mean over earlier tokens, so right padding never changes the
    logits of real tokens. `nan_at_call` / `crash_at_call` / `bad_grad_at_call` misbehave on the
    n-th training forward (NaN logits, a KeyboardInterrupt, an infinite gradient).
    """

    def __init__(self, vocab=32, dim=16, dropout=0.1, nan_at_call=None, crash_at_call=None,
                 bad_grad_at_call=None):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.lm_head = nn.Linear(dim, vocab)
        self.gradient_checkpointing = False
        self.nan_at_call, self.crash_at_call, self.calls = nan_at_call, crash_at_call, 0
        self.bad_grad_at_call = bad_grad_at_call

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        steps = torch.arange(1, x.size(1) + 1, device=x.device).view(1, -1, 1)
        h = x + torch.tanh(self.mix(x.cumsum(1) / steps))
        logits = self.lm_head(self.norm(self.drop(h)))  # (B, T, V)
        if self.training:
            self.calls += 1
            if self.calls == self.crash_at_call:
                raise KeyboardInterrupt("simulated crash")
            if self.calls == self.nan_at_call:
                logits = logits * float("nan")
            if self.calls == self.bad_grad_at_call:
                logits = _InfiniteGradient.apply(logits)
        return logits


class _InfiniteGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite); an infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def tiny_llama(vocab=64, hidden=32, intermediate=64):
    from minift.models.config import ModelConfig
    from minift.models.llama import Llama

    return Llama(ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64, torch_dtype="float32"))


def make_examples(n, vocab=32, seed=0):
    """Counting sequences (a, a+1, ...) mod vocab; a prompt of 1-3 tokens is not trained."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, length, prompt = rng.randrange(vocab), rng.randint(5, 12), rng.randint(1, 3)
        ids = [(start + i) % vocab for i in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def collate(examples, pad_id=0):
    """Right-padded (B, T) batch, the layout minift.data.sft.batch_examples produces."""
    t = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), t), pad_id, dtype=torch.long),
             "labels": torch.full((len(examples), t), -100, dtype=torch.long),
             "attention_mask": torch.zeros((len(examples), t), dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n] = torch.tensor(e["input_ids"])
        batch["labels"][i, :n] = torch.tensor(e["labels"])
        batch["attention_mask"][i, :n] = 1
    return batch


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


def cfg(tmp_path, **kw):
    base = dict(method="full", learning_rate=3e-2, warmup_ratio=0.0, micro_batch_size=4,
                bf16=False, progress=False, output_dir=str(tmp_path / "run"), keep_last=None)
    base.update(kw)
    return TrainConfig(**base)


def metrics(tmp_path, name="run"):
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


# ---- configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("field,value,match", [
    ("learning_rate", 0.0, "learning_rate"), ("learning_rate", -1e-4, "learning_rate"),
    ("warmup_ratio", 1.0, "warmup_ratio"), ("warmup_ratio", -0.1, "warmup_ratio"),
    ("grad_accum", 0, "grad_accum"), ("micro_batch_size", 0, "micro_batch_size"),
    ("epochs", 0, "epochs"), ("max_steps", 0, "max_steps"), ("keep_last", 0, "keep_last"),
    ("max_grad_norm", 0.0, "max_grad_norm"), ("weight_decay", -1.0, "weight_decay"),
    ("learning_rate", "1e-4", r"learning_rate must be a finite number in \(0, 3.4e37\), got str '1e-4'"),
    ("learning_rate", math.inf, r"learning_rate must be a finite number in \(0, 3.4e37\), got inf"),
    ("learning_rate", math.nan, r"learning_rate must be a finite number in \(0, 3.4e37\), got nan"),
    # AdamW's float32 update lr / (1 - beta1) overflows: one line here, not a traceback mid-step
    ("learning_rate", 1e38, r"learning_rate must be a finite number in \(0, 3.4e37\), got 1e\+38"),
    ("weight_decay", math.inf, "weight_decay must be a finite number"),
    ("max_grad_norm", math.inf, "max_grad_norm must be a finite number"),
    ("neftune_alpha", math.nan, "neftune_alpha must be a finite number"),
    ("seed", -5, r"seed must be an integer in \[0, 2\*\*32\), got -5"),
    ("seed", 2**32, "seed must be an integer"), ("seed", 1.5, "seed must be an integer"),
    ("warmup_ratio", None, "warmup_ratio"), ("micro_batch_size", 2.0, "micro_batch_size"),
    ("max_length", None, "max_length must be set when batching='pack'"),
    ("optimizer", "sgd", "optimizer must be one of adamw, adamw8bit, paged_adamw8bit"),
    ("method", "prefix", "method must be one of full, lora, qlora"),
    ("lr_scheduler", "step", "lr_scheduler must be one of cosine, linear, constant"),
    ("batching", "random", "batching must be one of bucket, pack"),
])
def test_config_rejects_bad_values(field, value, match):
    extra = {"batching": "pack"} if field == "max_length" else {}
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value}, **extra)


def test_schedule_warmup_then_decay():
    cos = Schedule.from_ratio(1.0, total_steps=10, warmup_ratio=0.2, kind="cosine")
    assert cos.warmup_steps == 2
    assert [cos.lr(0), cos.lr(1), cos.lr(2)] == [0.5, 1.0, 1.0]
    assert cos.lr(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    lrs = [cos.lr(i) for i in range(2, 10)]
    assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] > 0
    lin = Schedule(1.0, total_steps=4, warmup_steps=0, kind="linear")
    assert [lin.lr(i) for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert Schedule(0.1, 5, 1, "constant").lr(4) == 0.1


# ---- loss normalisation ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["toy", "llama"])
def test_accumulation_one_by_eight_equals_eight_by_one(kind):
    # The Llama pads the one big batch through its attention mask; the toy model needs none.
    model = TinyLM(dropout=0.0) if kind == "toy" else tiny_llama(vocab=32)
    examples = make_examples(8, seed=3)  # lengths and trained-token counts differ per example
    one_big = [collate(examples)]
    eight_small = [collate([e]) for e in examples]

    def grads(batches):
        model.zero_grad()
        loss, n = accumulate_gradients(model, batches, "cpu")
        return float(loss), n, [p.grad.clone() for p in model.parameters()]

    loss_a, n_a, ga = grads(one_big)
    loss_b, n_b, gb = grads(eight_small)
    assert n_a == n_b == sum(sum(l != -100 for l in e["labels"][1:]) for e in examples)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # A mean of per-micro-batch means would weight short examples up: it must differ here.
    model.zero_grad()
    with torch.no_grad():
        naive = sum(token_loss_sum(model(b["input_ids"]), b["labels"])
                    / (b["labels"][:, 1:] != -100).sum() for b in eight_small) / 8
    assert abs(float(naive) - loss_a) > 1e-3


# ---- the loop ----------------------------------------------------------------------------
def test_full_finetune_loss_falls_and_writes_outputs(tmp_path):
    data, held = make_examples(32, seed=1), make_examples(8, seed=2)
    summary = train(TinyLM(), data, cfg(tmp_path, epochs=3, eval_interval=10), eval_data=held)
    steps = 3 * 32 // 4
    assert summary["steps"] == steps and summary["epochs"] == pytest.approx(3.0)
    assert summary["last_loss"] < 0.6 * summary["first_loss"]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"} <= set(rows[0])
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20]
    assert [e["step"] for e in summary["eval"]] == [10, 20, 24]
    assert summary["eval"][-1]["eval_loss"] < summary["eval"][0]["eval_loss"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == steps
    assert summary["checkpoint"].endswith("step-24") and ckpt.is_complete(summary["checkpoint"])
    assert summary["trainable_params"] == summary["total_params"] > 0
    assert summary["tokens"] == sum(len(e["input_ids"]) for e in data) * 3


def test_max_steps_overrides_epochs_and_lr_follows_schedule(tmp_path):
    config = cfg(tmp_path, max_steps=10, epochs=1, warmup_ratio=0.2, lr_scheduler="linear")
    summary = train(TinyLM(), make_examples(16), config)  # 4 batches an epoch -> 2.5 epochs
    assert summary["steps"] == 10 and summary["epochs"] == pytest.approx(2.5)
    expected = Schedule.from_ratio(3e-2, 10, 0.2, "linear")
    assert [r["lr"] for r in metrics(tmp_path)] == pytest.approx([expected.lr(i) for i in range(10)])


def test_lora_on_llama_trains_only_adapters(tmp_path):
    from minift.lora.layer import lora_wrap

    base = tiny_llama()
    nn.init.normal_(base.lm_head.weight, std=1.0)  # a random base with 0.02-scale logits can't learn
    model = lora_wrap(base, r=8, alpha=16)
    before = {n: p.clone() for n, p in model.named_parameters()}
    summary = train(model, make_examples(32, vocab=64), cfg(tmp_path, method="lora", epochs=2,
                                                            learning_rate=1e-2))
    assert summary["last_loss"] < 0.5 * summary["first_loss"]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    saved = ckpt.load_file(summary["checkpoint"] + "/model.safetensors")
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_equal_lora_grads_on_frozen_base():
    from minift.lora.layer import lora_wrap

    model = lora_wrap(tiny_llama(), r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would make every lora_A grad zero
            nn.init.normal_(p, std=0.1)
    batch = [collate(make_examples(4, vocab=64, seed=5))]

    def grads(enabled):
        model.gradient_checkpointing = enabled
        model.zero_grad()
        accumulate_gradients(model, batch, "cpu")
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, recomputed = grads(False), grads(True)
    assert all(g.abs().sum() > 0 for g in recomputed.values())
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=0)


def test_gradient_checkpointing_needs_a_model_that_supports_it(tmp_path):
    model = nn.Sequential(nn.Embedding(32, 8), nn.Linear(8, 32))
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        train(model, make_examples(4), cfg(tmp_path, gradient_checkpointing=True))


def test_without_a_terminal_progress_prints_log_lines_and_memory_table(tmp_path, capsys):
    train(TinyLM(), make_examples(16), cfg(tmp_path, progress=True, log_interval=2))
    out = capsys.readouterr().out
    assert [line.split(" loss")[0] for line in out.splitlines() if line.startswith("step ")] == \
        ["step 2/4", "step 4/4"]
    assert "activations" in out and "optimizer_states" in out  # the first step's breakdown
    assert "peak RSS" in out and "the step lines show peak RSS" in out  # each peak says what it is
    train(TinyLM(), make_examples(16), cfg(tmp_path / "quiet", progress=False))
    assert capsys.readouterr().out == ""


def test_padding_efficiency_is_reported_once_and_in_the_summary(tmp_path, capsys):
    from minift.data.sft import padding_efficiency
    from minift.training.schedule import epoch_batches

    data = make_examples(32, seed=4)  # lengths 5-12: batches of 4 carry some padding
    config = cfg(tmp_path, epochs=2, progress=True, log_interval=100)
    summary = train(TinyLM(), data, config)
    batches = epoch_batches(data, config, 0) + epoch_batches(data, config, 1)
    assert summary["padding_efficiency"] == pytest.approx(padding_efficiency(batches), abs=1e-12)
    assert 0.5 < summary["padding_efficiency"] < 1.0
    printed = [line for line in capsys.readouterr().out.splitlines() if "padding efficiency" in line]
    assert printed == [f"padding efficiency {summary['padding_efficiency']:.1%} (real tokens / slots "
                       f"of the padded micro-batches of all 16 steps)"]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["padding_efficiency"] == summary["padding_efficiency"]


def test_bf16_autocast_and_neftune_train(tmp_path):
    model = TinyLM()
    summary = train(model, make_examples(16), cfg(tmp_path, bf16=True, neftune_alpha=5.0, epochs=3))
    assert summary["last_loss"] < summary["first_loss"]
    assert not model.model.embed_tokens._forward_hooks  # the noise hook is gone afterwards


@pytest.mark.parametrize("kind,match", [("nan loss", "loss is nan at step 3"),
                                        ("inf loss", "loss is inf at step 3"),
                                        ("inf grad", "gradient norm is (inf|nan) at step 3")])
def test_non_finite_step_saves_nothing_and_names_the_newest_good_checkpoint(tmp_path, monkeypatch,
                                                                             kind, match):
    import minift.objectives.sft as train_mod  # where the loop's token loss is computed
    model = TinyLM(nan_at_call=3 if kind == "nan loss" else None,
                   bad_grad_at_call=3 if kind == "inf grad" else None)
    if kind == "inf loss":
        real, calls = train_mod.token_loss_sum, []

        def inf_at_third(logits, labels):
            calls.append(1)
            return real(logits, labels) * (math.inf if len(calls) == 3 else 1.0)

        monkeypatch.setattr(train_mod, "token_loss_sum", inf_at_third)
    run = tmp_path / "run"
    # keep_last=1: step-1 survives the save of step 2, whose weights no step had used yet
    with pytest.raises(FloatingPointError, match=rf"{match} \(the step's rows: [0-9, ]+ of train_data\); "
                                                 rf"step-2, whose weights gave it, is "
                                                 rf"renamed diverged-step-2; .* is {run}/step-1;"):
        train(model, make_examples(32), cfg(tmp_path, save_interval=1, keep_last=1))
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    assert ckpt.latest_checkpoint(run) == str(run / "step-1")
    assert ckpt.resolve_checkpoint("latest", run) == str(run / "step-1")
    saved = ckpt.load_file(str(run / "diverged-step-2" / "model.safetensors"))
    for name, p in model.state_dict().items():  # step 3 changed nothing
        assert torch.equal(saved[name], p)


def test_huge_learning_rate_never_leaves_a_diverged_checkpoint_to_resume(tmp_path):
    with pytest.raises(FloatingPointError) as err:
        train(TinyLM(), make_examples(32), cfg(tmp_path, learning_rate=1e30, optimizer="adamw8bit",
                                               save_interval=1, keep_last=1))
    assert "\n" not in str(err.value)
    for _, path in ckpt.list_checkpoints(tmp_path / "run"):
        for name, t in ckpt.load_file(path + "/model.safetensors").items():
            assert torch.isfinite(t).all() and t.abs().max() < 1e6, (path, name)


def test_dead_model_warns(tmp_path):
    model = TinyLM(dropout=0.0)
    with torch.no_grad():  # a dead model: no weight gets a gradient any more
        for p in model.parameters():
            p.zero_()
    model.lm_head.bias.requires_grad_(False)  # uniform logits, and every gradient is 0
    with pytest.warns(UserWarning) as caught:
        train(model, make_examples(16), cfg(tmp_path))
    messages = [str(w.message) for w in caught]
    assert any("step 1: gradient norm is exactly 0" in m for m in messages)
    assert any("step 3: the loss has stayed at ln(vocab) = 3.4657 for 3 steps" in m for m in messages)


def test_fresh_run_refuses_a_folder_with_another_runs_checkpoints(tmp_path):
    train(TinyLM(), make_examples(8), cfg(tmp_path, max_steps=2, save_interval=1))
    with pytest.raises(ValueError, match=r"holds the checkpoints of an earlier run \(step-1, step-2\)"):
        train(TinyLM(), make_examples(8), cfg(tmp_path, max_steps=1, keep_last=1))
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "run")] == [1, 2]


def test_lora_method_on_a_model_without_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="method='lora', but the model has no LoRA adapters"):
        train(TinyLM(), make_examples(8), cfg(tmp_path, method="lora"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_token_id_outside_the_vocabulary_is_one_line(tmp_path):
    data = make_examples(8) + [{"input_ids": [1, 2, 40], "labels": [-100, 2, 40]}]
    with pytest.raises(ValueError, match=r"train_data\[8\]: input_ids\[2\] is token id 40, outside "
                                         r"the model's vocabulary of 32"):
        train(TinyLM(), data, cfg(tmp_path))


def test_resume_drops_a_torn_metrics_line_and_rewrites_atomically(tmp_path):
    data = make_examples(16)
    train(TinyLM(), data, cfg(tmp_path, max_steps=2, save_interval=1))
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')  # killed while writing step 3's line
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropped a torn last line"):
        train(TinyLM(), data, cfg(tmp_path, max_steps=4, resume_from="latest"))
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]


@pytest.mark.parametrize("bad,match", [([], "train_data must be a non-empty list"),
                                       ([{"input_ids": [1, 2]}], r"train_data\[0\]"),
                                       ([{"input_ids": [1, 2], "labels": [1]}], r"train_data\[0\]: input_ids")])
def test_bad_train_data_is_named(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        train(TinyLM(), bad, cfg(tmp_path))


def test_no_trainable_parameters_is_an_error(tmp_path):
    model = TinyLM().requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        train(model, make_examples(4), cfg(tmp_path))


def test_qlora_trains_adapters_on_nf4_base_with_checkpointing_and_packing(tmp_path):
    from minift.lora.layer import lora_wrap, trainable_parameters
    from minift.nf4.linear import NF4Linear, quantize_model

    base = tiny_llama()
    nn.init.normal_(base.lm_head.weight, std=1.0)
    model = lora_wrap(quantize_model(base), r=8, alpha=16)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    config = cfg(tmp_path, method="qlora", epochs=3, learning_rate=1e-2, gradient_checkpointing=True,
                 optimizer="adamw8bit", batching="pack", max_length=32, micro_batch_size=2)
    summary = train(model, make_examples(32, vocab=64), config)
    assert summary["last_loss"] < 0.5 * summary["first_loss"]
    assert model.gradient_checkpointing is False  # the loop puts the flag back
    assert (summary["trainable_params"], summary["total_params"]) == trainable_parameters(model)
    saved = ckpt.load_file(summary["checkpoint"] + "/model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert set(summary["memory"]) >= {"frozen_weights", "trainable_params", "gradients",
                                      "optimizer_states", "activations", "other", "peak"}
    assert summary["memory"]["frozen_weights"] > 0 and summary["memory"]["optimizer_states"] > 0


def test_minift_train_is_callable_after_importing_the_module(tmp_path):
    import minift
    import minift.training.loop  # noqa: F401  (the defining module; minift.train stays the function)

    with pytest.raises(ValueError, match="train_data must be a non-empty list"):
        minift.train(TinyLM(), [], cfg(tmp_path))
    assert minift.TrainConfig is TrainConfig


def test_summary_is_replaced_atomically(tmp_path, monkeypatch):
    import os

    data = make_examples(8)
    train(TinyLM(), data, cfg(tmp_path, max_steps=1))
    before = (tmp_path / "run" / "summary.json").read_text()
    real = os.replace

    def killed_at_summary(src, dst):
        if str(dst).endswith("summary.json"):
            raise KeyboardInterrupt("killed while writing summary.json")
        real(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_summary)
    with pytest.raises(KeyboardInterrupt):
        train(TinyLM(), data, cfg(tmp_path, max_steps=2, resume_from="latest"))
    assert (tmp_path / "run" / "summary.json").read_text() == before
    assert sorted(os.listdir(tmp_path / "run")) == ["metrics.jsonl", "step-1", "step-2", "summary.json"]


class PoisonLM(TinyLM):
    """NaN logits for any batch holding token `POISON`: a NaN that the data causes."""
    POISON = 39

    def __init__(self):
        super().__init__(vocab=40, dropout=0.0)

    def forward(self, input_ids, **kw):
        logits = super().forward(input_ids, **kw)
        return logits * math.nan if bool((input_ids == self.POISON).any()) else logits


def test_a_nan_from_one_batch_names_its_rows_and_can_be_skipped_exactly(tmp_path):
    from minift.training.schedule import batch_rows
    data, config, step = make_examples(32), cfg(tmp_path, save_interval=1), 4
    bad = batch_rows(data, config, 0, step - 1, 1)[0]  # a row of step 4's micro-batch
    ids = data[bad]["input_ids"]  # the same length: the batches stay as they were
    data[bad] = {"input_ids": ids[:2] + [PoisonLM.POISON] + ids[3:], "labels": data[bad]["labels"]}
    run = tmp_path / "run"
    torch.manual_seed(0)
    with pytest.raises(FloatingPointError, match=rf"loss is nan at step {step}, and the cause is its data: .* "
                                                 rf"rows [0-9, ]*\b{bad}\b[0-9, ]* of train_data \(epoch 0\); "
                                                 rf".*resume from {run}/step-{step - 1} with "
                                                 rf"skip_steps=\[{step}\] \(--skip-step {step}\)"):
        train(PoisonLM(), data, config)
    assert not list(run.glob("diverged-*"))  # the good checkpoint is not blamed and set aside
    with pytest.raises(ValueError, match=r"skip_steps=\[1\] changes that; only steps after"):
        train(PoisonLM(), data, cfg(tmp_path, save_interval=1, resume_from="latest", skip_steps=[1]))
    torch.manual_seed(0)
    resumed = PoisonLM()
    train(resumed, data, cfg(tmp_path, save_interval=1, resume_from="latest", skip_steps=[step]))
    lines = metrics(tmp_path)
    skipped = [r for r in lines if r.get("skipped")]
    assert [r["step"] for r in skipped] == [step] and bad in skipped[0]["rows"]
    assert [r["step"] for r in lines if not r.get("skipped")][-1] == 8
    # the same skip from the start gives the same weights: resume stays exact
    torch.manual_seed(0)
    straight = PoisonLM()
    train(straight, data, cfg(tmp_path / "b", save_interval=1, skip_steps=[step]))
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name
