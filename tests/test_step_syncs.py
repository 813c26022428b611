"""Host-device syncs of the training step on CUDA, counted without a GPU.

`sync_counter.StepSyncs` runs the real step (`minift.training.loop.run_step` under
`step_switches`, what `minift.train` runs for each step) in a planning trace of the CUDA path
(`minift.planning.trace.trace_step(device="cuda")`): paging's streams, the fused 8-bit step and
pinned offload take their CUDA branches, fake tensors are device tensors and the micro-batch is
host data until `to_device` moves it. Every read of a device value, copy of one to the host,
blocking copy to the device and stream/event synchronize inside `run_step` is logged.

What remains, for every method, feature and model size below: exactly one sync per step, in
`run_step`, after the backward and before the optimizer step. It reads the loss, the gradient
norm and the objective's metrics (DPO's reward and log-prob means) together: the step needs the
loss and the norm to decide whether to step the optimizer or stop on NaN/Inf, and the metrics
line of every step takes them from the same read. Everything else stays on the device or is read
from the host batch: the trained-token and pair counts, which chunks of the chunked loss hold a
scored token, the blank pairs of a rank; with `optimizer_in_backward` the hooks read nothing
(the norm is summed on the device), and paging orders its copies with events, waiting on the
host only when the states are read (`Pager.flush`, for `state_dict`).

Outside `run_step` the loop reads only host data per step (the token count of the metrics line
from the host attention mask). Not covered: a run's first step takes the memory tracker, whose
CUDA branch synchronizes the device around the step to read the allocator's statistics (it
measures); evaluation and checkpoints read what they report. A CPU run cannot count these syncs directly (every tensor is a host tensor there,
and torch's AdamW reads its host step counters once per parameter), which is why the count runs
in a trace of the CUDA path.
"""
import warnings

import pytest
import torch
from sync_counter import StepSyncs

import minift.objectives.sft
from minift import tracing
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.objectives.dpo import objective_for
from minift.objectives.sft import SFTObjective
from minift.optim import in_backward
from minift.planning.trace import build_model, make_data, trace_step
from minift.training.config import TrainConfig
from minift.training.loop import run_step, step_switches
from minift.training.schedule import step_groups
from minift.training.setup import make_optimizer

THE_READ = ["minift.training.loop.run_step"]

# name: (method, TrainConfig fields, world size); loss chunks of 8 tokens over 2 x 32 tokens
CASES = {
    "full-adamw": ("full", {}, 1),
    "full-checkpointed-chunked": ("full", dict(gradient_checkpointing=True, loss_chunk_size=8), 1),
    "full-clipped-8bit": ("full", dict(max_grad_norm=0.5, optimizer="adamw8bit", loss_chunk_size=8), 1),
    "full-paged-nothing-kept": ("full", dict(optimizer="paged_adamw8bit", paged_device_budget=0), 1),
    "full-in-backward-paged": ("full", dict(optimizer_in_backward=True, max_grad_norm=None,
                                            optimizer="paged_adamw8bit", paged_device_budget=0), 1),
    "lora-chunked-accum": ("lora", dict(loss_chunk_size=8, grad_accum=2), 1),
    "qlora-checkpointed-chunked": ("qlora", dict(gradient_checkpointing=True, loss_chunk_size=8), 1),
    "qlora-all-features": ("qlora", dict(gradient_checkpointing=True, activation_offload=True,
                                         optimizer_in_backward=True, max_grad_norm=None,
                                         optimizer="paged_adamw8bit", paged_device_budget=0,
                                         mlp_tile_size=8, loss_chunk_size=8), 1),
    "dpo-lora-chunked": ("lora", dict(objective="dpo", loss_chunk_size=8), 1),
    "dpo-full-chunked": ("full", dict(objective="dpo", loss_chunk_size=8, gradient_checkpointing=True), 1),
    "fsdp-full-chunked": ("full", dict(gradient_checkpointing=True, loss_chunk_size=8), 2),
    "fsdp-lora-8bit": ("lora", dict(optimizer="adamw8bit", loss_chunk_size=8), 2),
    "fsdp-dpo-lora": ("lora", dict(objective="dpo", loss_chunk_size=8), 2),
}


def model(layers: int) -> ModelConfig:
    config = ModelConfig.from_name("tiny")
    config.num_hidden_layers = layers
    return config


def step_syncs(method, fields, world_size=1, layers=1, targets="all-linear", device="cuda") -> StepSyncs:
    with StepSyncs() as syncs:
        trace_step(model(layers), TrainConfig(method=method, **fields), batch_size=2, seq_len=32,
                   device=device, target_modules=targets, padded=True, world_size=world_size)
    assert syncs.steps == 1
    return syncs


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_sync_per_step_whatever_the_layers_and_adapted_modules(name):
    method, fields, world_size = CASES[name]
    # 1 and 3 layers; LoRA on one projection or on all seven (full trains every parameter)
    targets = ["all-linear"] if method == "full" else [["q_proj"], "all-linear"]
    for layers in (1, 3):
        for target in targets:
            syncs = step_syncs(method, fields, world_size, layers, target)
            assert syncs.log == THE_READ, (layers, target, syncs.log)


def test_the_counter_sees_a_read_per_parameter_in_backward(monkeypatch):
    # the hook as it was: a read of each gradient's norm decides whether to step the parameter
    def hook(self, p):
        norm = tracing.known(p.grad.norm(), 0.0)
        if norm == norm:
            self.optimizer.step()
        p.grad = None

    monkeypatch.setattr(in_backward.StepInBackward, "_hook", hook)
    fields = dict(optimizer_in_backward=True, max_grad_norm=None)
    for layers in (1, 3):
        log = step_syncs("full", fields, layers=layers).log
        params = len(list(Llama(model(layers)).parameters()))
        assert log == ["test_step_syncs.hook"] * params + THE_READ


def test_the_counter_sees_device_labels_read_for_the_loss_chunks(monkeypatch):
    # without the host labels' chunks, chunked_loss_sum reads the labels on the device
    monkeypatch.setattr(minift.objectives.sft, "scored_chunks", lambda labels, chunk: None)
    syncs = step_syncs("lora", dict(loss_chunk_size=8, grad_accum=2))
    assert syncs.log == ["minift.objectives.loss.scored_chunks"] * 2 + THE_READ  # once per micro-batch


@pytest.mark.parametrize("name", ["full-in-backward-paged", "qlora-all-features", "fsdp-lora-8bit"])
def test_the_cpu_path_reads_what_the_cuda_path_reads(name):
    # the CPU branches (synchronous paging and offload copies, the torch 8-bit step, SDPA) read
    # the same values; only the attention reads a padded mask to see whether it is all ones,
    # which on a GPU would be a device read and is skipped there (on the host it is free)
    method, fields, world_size = CASES[name]
    cuda = step_syncs(method, fields, world_size, layers=3).log
    cpu = step_syncs(method, fields, world_size, layers=3, device="cpu").log
    assert cuda == THE_READ
    assert cpu == ["minift.models.attention.batch_mask"] + THE_READ  # one padded micro-batch


def gpu_step_syncs(name, device, steps=3, sync_debug=True) -> list:
    """Real steps of case ``name`` on ``device`` (3 layers, padded 2 x 32 micro-batches), each
    run under ``torch.cuda.set_sync_debug_mode("warn")`` when ``sync_debug``: the syncs CUDA
    itself reports, per step, as "file:line" of the Python code that made each."""
    method, fields, _ = CASES[name]
    config = TrainConfig(method=method, bf16=device.type == "cuda", **fields)
    torch.manual_seed(0)
    cfg = model(3)
    llama = build_model(cfg, method, torch.float32).to(device)
    data = make_data(cfg, config, 2, 32, padded=True)
    objective = objective_for(llama, config, data) if config.objective == "dpo" else \
        SFTObjective(config.loss_chunk_size)
    optimizer = make_optimizer(llama, config)
    stepper = in_backward.StepInBackward(optimizer) if config.optimizer_in_backward else None
    groups, seen = step_groups(data, config), []
    with step_switches(llama, config, stepper, compile_layers=False):
        for _ in range(steps):
            group = next(groups)[2]
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if sync_debug:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    loss, norm, *_ = run_step(llama, optimizer, objective, group, device, config, stepper)
                finally:
                    if sync_debug:
                        torch.cuda.set_sync_debug_mode("default")
            assert loss == loss and norm == norm  # finite: the optimizer stepped
            seen.append([f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)])
    return seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts the syncs CUDA reports, on a GPU")
@pytest.mark.parametrize("name", ["full-checkpointed-chunked", "full-in-backward-paged", "qlora-all-features",
                                  "dpo-lora-chunked"])
def test_on_a_gpu_cuda_reports_one_sync_per_step(name):
    # the first step also sets up optimizer states (pinned host pages, 8-bit maps): from step 2
    per_step = gpu_step_syncs(name, torch.device("cuda"))
    assert [len(s) for s in per_step[1:]] == [1, 1], per_step
