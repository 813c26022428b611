"""The memory of a training step, traced: the real step on fake tensors, counted by the tracker.

`trace_step` builds the model at its real shapes under ``torch._subclasses.FakeTensorMode``
(shapes and dtypes, no storage: Llama-3.1-70B on a laptop), prepares it as
``examples/train_llama.py`` does (full; LoRA-wrapped; NF4-quantized and LoRA-wrapped), makes a
batch of the asked shape from real token ids, and runs `minift.training.loop.run_step` with
`minift.training.loop.step_switches` — the code `minift.train` runs for one step — under a
`MemoryTracker`. The target device's code path is chosen with `minift.tracing.planning`: Flex
attention, the fused kernels, pinned-host offload with its prefetch, paging's streams and the fused
8-bit step on "cuda", the CPU path on "cpu".

What it returns is the tracker's report (the same categories and accounting as a measured step),
the moment of the peak, and the step's allocation sequence replayed through a simulation of
PyTorch's CUDA caching allocator (`minift.memory.allocator`) for the ``reserved`` bytes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from minift.checks import check_choice, check_flag, check_int
from minift.distributed import parallel as mdist
from minift.lora.layer import check_modules_to_save, lora_wrap
from minift.memory.allocator import replay
from minift.memory.report import MemoryReport
from minift.memory.tracker import MemoryTracker
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.names import LINEARS
from minift.nf4.linear import quantize_model
from minift.objectives.dpo import objective_for
from minift.objectives.sft import SFTObjective
from minift.tracing import planning
from minift.training.config import TrainConfig
from minift.training.loop import run_step, step_switches
from minift.training.schedule import step_groups
from minift.training.setup import make_optimizer, seed_everything


@dataclass
class Trace:
    """One traced step: the tracker's report and what the trace adds to it."""

    report: MemoryReport  # device categories, peak, host; `moment` names where the peak is
    reserved: int  # simulated peak of the CUDA caching allocator's reserved bytes
    reserved_expandable: int  # the same with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    seconds: float  # time to build the model and trace the step
    settings: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dict(self.report.as_dict(), reserved=self.reserved,
                    reserved_expandable=self.reserved_expandable,
                    trace_seconds=round(self.seconds, 2), settings=self.settings)


def resolve_config(config_or_preset: Union[ModelConfig, str]) -> ModelConfig:
    if isinstance(config_or_preset, ModelConfig):
        return config_or_preset
    if isinstance(config_or_preset, str):
        return ModelConfig.from_name(config_or_preset)
    raise TypeError(f"config_or_preset must be a ModelConfig or a preset name, "
                    f"got {type(config_or_preset).__name__}")


def targets_of(target_modules) -> Union[str, list]:
    """``target_modules`` checked: "all-linear" or a list of decoder linear names."""
    if target_modules == "all-linear":
        return target_modules
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    try:
        names = list(dict.fromkeys(target_modules))  # lora_wrap adapts a module once
    except TypeError:
        raise TypeError(f"target_modules must be 'all-linear' or a list of names, got "
                        f"{type(target_modules).__name__}") from None
    if not names:
        raise ValueError(f"target_modules is empty: nothing would be adapted; use 'all-linear' or a "
                         f"list of {', '.join(LINEARS)}")
    unknown = [t for t in names if t not in LINEARS]
    if unknown:
        raise ValueError(f"target_modules: unknown names {unknown}; use 'all-linear' or a list of "
                         f"{', '.join(LINEARS)}")
    return names


def build_model(cfg: ModelConfig, method: str, dtype: torch.dtype, *, r: int = 16,
                target_modules="all-linear", adapter_dtype: torch.dtype = torch.float32,
                blocksize: int = 64, lm_head_nf4: bool = False,
                modules_to_save=None) -> torch.nn.Module:
    """The model as a run prepares it: weights in ``dtype``; full trains them all; LoRA freezes
    them and wraps adapters; QLoRA quantizes the decoder linears to NF4 (lm_head stays, as
    ``minift.load_model(quantize="nf4")`` leaves it) and wraps adapters. ``modules_to_save``
    (LoRA, QLoRA) trains those modules whole, as `minift.lora_wrap`. Under a fake mode the
    weights are fake."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place: .to(dtype) cannot swap fake parameters
    try:
        model = Llama(cfg)
    finally:
        torch.set_default_dtype(previous)
    if lm_head_nf4 and (method != "qlora" or cfg.tie_word_embeddings):
        raise ValueError("lm_head_nf4 stores lm_head in NF4: it applies to method='qlora' on a model "
                         "whose lm_head is not tied to the embedding")
    if method == "full":
        if modules_to_save:
            raise ValueError("modules_to_save applies to method='lora' or 'qlora'; 'full' trains "
                             "every module already")
        return model.requires_grad_(True)
    if method == "qlora":
        quantize_model(model, skip=() if lm_head_nf4 else ("lm_head",), blocksize=blocksize)
    return lora_wrap(model, r=r, alpha=2 * r, target_modules=target_modules,
                     adapter_dtype=adapter_dtype, modules_to_save=modules_to_save)


def make_data(cfg: ModelConfig, config: TrainConfig, batch_size: int, seq_len: int,
              padded: bool) -> list:
    """Rows of real token ids that batch into ``grad_accum`` micro-batches of (batch_size,
    seq_len): SFT examples with every label trained, or DPO pairs whose halves are seq_len long
    (the prompt is half of each). With ``padded`` one row is a token short, so the batches carry
    padding and take the masked attention path."""
    rows = batch_size * config.grad_accum
    vocab = cfg.vocab_size

    def ids(i, length):
        return [(7 * i + j) % vocab for j in range(length)]

    lengths = [seq_len - (1 if padded and i % batch_size == 0 else 0) for i in range(rows)]
    if config.objective == "dpo":
        prompt = seq_len // 2
        return [{"chosen_ids": ids(i, n), "rejected_ids": ids(i + 1, n),
                 "chosen_labels": [-100] * prompt + ids(i, n)[prompt:],
                 "rejected_labels": [-100] * prompt + ids(i + 1, n)[prompt:]}
                for i, n in enumerate(lengths)]
    return [{"input_ids": ids(i, n), "labels": ids(i, n)} for i, n in enumerate(lengths)]


def trace_step(config_or_preset: Union[ModelConfig, str], config: Optional[TrainConfig] = None, *,
               batch_size: int = 1, seq_len: int = 512, device: str = "cuda",
               dtype: torch.dtype = torch.bfloat16, r: int = 16, target_modules="all-linear",
               adapter_dtype: torch.dtype = torch.float32, blocksize: int = 64,
               padded: bool = False, lm_head_nf4: bool = False, world_size: int = 1,
               fake: bool = True, modules_to_save=None) -> Trace:
    """Trace one training step of ``config`` (a `TrainConfig`; its micro_batch_size is replaced by
    ``batch_size``) on a model of ``config_or_preset``'s shape, on ``device``'s code path.

    With ``world_size`` > 1 (``config.parallel`` "fsdp", the default, or "ddp") the step is one
    rank's of a torchrun job: the model is sharded or replicated by
    `minift.distributed.parallel.apply_parallel` over torch's fake process group (collectives
    that move no data), and the report is per GPU.

    ``fake=False`` runs the same step on real tensors instead (the CPU path only; with
    world_size > 1 inside an initialized process group of that size): what the agreement tests
    compare the trace with. ``modules_to_save`` (LoRA, QLoRA): modules trained whole, as
    `minift.lora_wrap`'s; their weights, gradients and optimizer states are counted as trainable.
    """
    cfg = resolve_config(config_or_preset)
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a minift.TrainConfig, got {type(config).__name__}")
    batch_size = check_int("batch_size", batch_size, error=TypeError)
    seq_len = check_int("seq_len", seq_len, error=TypeError)
    device = check_choice("device", device, ("cuda", "cpu"))
    padded = check_flag("padded", padded)
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is longer than the model's max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    if not fake and device != "cpu":
        raise ValueError("a step on real tensors runs the CPU path only (device='cpu')")
    world_size = check_int("world_size", world_size)
    if world_size > 1 and config.optimizer_in_backward:
        raise ValueError("optimizer_in_backward=True is not supported with world_size > 1 (its hooks "
                         "would step on gradients before they are reduced across ranks)")
    if config.compile:
        raise ValueError("compile=True is not traced: torch.compile's fused kernels allocate other tensors "
                         "than the eager step; trace with compile=False (an upper bound)")
    if config.fsdp_cpu_offload:
        raise ValueError("fsdp_cpu_offload is not traced: FSDP would move the shards to the host, and "
                         "in a trace the host and the stand-in device are one CPU; plan without it")
    if world_size > 1 and config.parallel == "ddp" and fake:
        return _ddp(cfg, config, world_size, locals())
    if config.precompute_reference:
        raise ValueError("precompute_reference scores the pairs before training; trace the step "
                         "without it (the stored log-probs take no device memory)")
    # packed batching packs rows into max_length tokens: one row of seq_len each here
    config = dataclasses.replace(config, micro_batch_size=batch_size,
                                 max_length=seq_len if config.batching == "pack" else None)
    started = time.perf_counter()
    data = make_data(cfg, config, batch_size, seq_len, padded)  # real: values read on the host
    group = next(step_groups(data, config))[2]
    mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True) if fake \
        else contextlib.nullcontext()
    cpu = torch.device("cpu")
    group_pg = _process_group(world_size, fake)
    if world_size > 1:
        config = dataclasses.replace(config, parallel=config.parallel or "fsdp")
    with planning(device), mode, group_pg as shard, warnings.catch_warnings():
        # deep copies (a DPO reference) ask a fake tensor for its data pointer; nothing reads it
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        # the batch stays real (the step reads its values on the host, minift.tracing.known);
        # its fake twins are made once and held, so every operator sees the same fake storage
        held = [mode.from_tensor(t) for b in group for t in b.values()] if fake else []
        _warm_caches()
        seed_everything(config.seed)
        model = build_model(cfg, config.method, dtype, r=r, target_modules=targets_of(target_modules),
                            adapter_dtype=adapter_dtype, blocksize=blocksize, lm_head_nf4=lm_head_nf4,
                            modules_to_save=modules_to_save)
        objective = objective_for(model, config, data, distributed=shard is not None) \
            if config.objective == "dpo" else SFTObjective(config.loss_chunk_size)
        if shard is not None:  # as minift.distributed.run.DistRun lays the run out
            model = mdist.apply_parallel(model, config, device=cpu)
            objective.distribute(shard, lambda m: mdist.apply_parallel(m, config, device=cpu, frozen=True)
                                 if config.parallel == "fsdp" else m)
            mdist.reshard(model)
        optimizer = make_optimizer(model, config)
        stepper = None
        if config.optimizer_in_backward:
            from minift.optim.in_backward import StepInBackward
            stepper = StepInBackward(optimizer)
        tracker = MemoryTracker(model, optimizer, frozen=objective.frozen_models(), record_events=True)
        model.train()
        with step_switches(model, config, stepper, compile_layers=False):
            params = [p for p in model.parameters() if p.requires_grad]
            gc.collect()  # no garbage of the setup is freed inside the step at a time the
            gc.disable()  # collector chooses: what the step frees, it frees where the code says
            try:
                with tracker.track():
                    run_step(model, optimizer, objective, group, cpu, config, stepper, shard=shard,
                             clip=lambda: mdist.clip_grad_norm_on_device(params, config.max_grad_norm or math.inf))
            finally:
                gc.enable()
        report = tracker.report()
        events = tracker.events()
        del held
    report.device = device
    seconds = time.perf_counter() - started
    name = config_or_preset if isinstance(config_or_preset, str) else cfg.model_type
    settings = dict(model=name, method=config.method, objective=config.objective,
                    batch_size=batch_size, seq_len=seq_len, grad_accum=config.grad_accum,
                    r=r if config.method != "full" else None, dtype=str(dtype).replace("torch.", ""),
                    device=device, padded=padded, optimizer=config.optimizer, world_size=world_size,
                    parallel=config.parallel if world_size > 1 else None,
                    modules_to_save=check_modules_to_save(modules_to_save) if modules_to_save else None)
    return Trace(report=report, reserved=replay(events)["max_reserved"],
                 reserved_expandable=replay(events, expandable_segments=True)["max_reserved"],
                 seconds=seconds, settings=settings)


def _ddp(cfg: ModelConfig, config: TrainConfig, world_size: int, args: dict) -> Trace:
    """One GPU of a DDP job: every rank holds the whole model and runs the one-process step on its
    own micro-batch, and DDP's reducer adds its gradient buckets, a flat copy of every trainable
    gradient (``gradient_as_bucket_view=False``, torch's default, kept by
    ``minift.distributed.parallel.apply_parallel``), allocated at the first backward and kept from
    then on. torch's DDP cannot be built over fake tensors, so this one closed form stays; the
    buckets are made in C++ and a MemoryTracker on real tensors does not see them either."""
    kw = {k: args[k] for k in ("batch_size", "seq_len", "device", "dtype", "r", "target_modules",
                               "adapter_dtype", "blocksize", "padded", "lm_head_nf4", "modules_to_save")}
    trace = trace_step(cfg, dataclasses.replace(config, parallel=None), **kw)
    rep = trace.report
    buckets = rep.trainable_params  # one gradient per trainable value, in its own dtype
    rep.gradients += buckets
    rep.peak += buckets
    rep.notes.append(f"ddp: the reducer's gradient buckets ({buckets} bytes) added to gradients and peak")
    trace.reserved += buckets
    trace.reserved_expandable += buckets
    trace.settings.update(world_size=world_size, parallel="ddp")
    return trace


@contextlib.contextmanager
def _process_group(world_size: int, fake: bool):
    """The `Shard` of rank 0 of a ``world_size`` job (None for one process): over torch's fake
    process group for a trace, over the caller's initialized group for a real step."""
    import torch.distributed as dist
    if world_size == 1:
        yield None
        return
    if not fake:
        if not dist.is_initialized() or dist.get_world_size() != world_size:
            raise ValueError(f"a real step with world_size={world_size} runs inside an initialized "
                             f"process group of that size")
        yield mdist.Shard(dist.get_rank(), world_size, torch.device("cpu"))
        return
    if dist.is_initialized():
        raise RuntimeError("trace_step with world_size > 1 sets up a fake process group; call it from a "
                           "process without one (not under torchrun)")
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield mdist.Shard(0, world_size, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def _warm_caches() -> None:
    """Build the per-process tables the CPU path caches (NF4 byte-pair table, 8-bit requantize
    tables) before the step: a process builds them once, not in every step."""
    from minift.nf4.dequant import pair_table
    from minift.optim.quant8 import requant_table
    from minift.quantmaps import dynamic_map, nf4_code
    with torch._subclasses.fake_tensor.unset_fake_temporarily():
        pair_table(nf4_code())
        for signed in (True, False):
            requant_table(dynamic_map(signed))
