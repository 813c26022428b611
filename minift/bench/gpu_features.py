"""The GPU suite's parts that exercise what the plain steps leave out: attention over padded and
packed batches (FlexAttention with a block mask on CUDA), and minift's own training step with a
memory feature on (activation offload, paged 8-bit states) or with compiled layers.

The feature steps run `minift.training.loop.run_step` under `step_switches`, the code
`minift.train` runs for each step, on a model prepared as `examples/train_llama.py` prepares it
(`minift.planning.trace.build_model`), so the measured peak sits beside the traced estimate of the
same `TrainConfig` (`minift.estimate_memory`, which runs that same step on fake tensors).
"""
from __future__ import annotations

import dataclasses
import statistics
import warnings

import torch

from minift.bench.gpu_steps import LORA_R, _free, measure_step, train_flops_per_token
from minift.models.attention import attend, batch_mask
from minift.models.config import ModelConfig
from minift.objectives.sft import SFTObjective
from minift.planning.trace import build_model, make_data
from minift.training.config import TrainConfig
from minift.training.loop import run_step, step_switches
from minift.training.schedule import step_groups
from minift.training.setup import make_optimizer, seed_everything

CHUNK = 1024  # tokens per chunk of the loss in the feature steps

# (name, TrainConfig): each a step of the preset at the suite's batch shape; "lora_eager" is the
# baseline the compiled step is compared with
FEATURE_STEPS = (
    ("qlora_offload", TrainConfig(method="qlora", gradient_checkpointing=True, activation_offload=True,
                                  loss_chunk_size=CHUNK)),
    ("full_paged", TrainConfig(method="full", optimizer="paged_adamw8bit", paged_device_budget=0,
                               gradient_checkpointing=True, loss_chunk_size=CHUNK)),
    ("lora_eager", TrainConfig(method="lora", gradient_checkpointing=True, loss_chunk_size=CHUNK)),
    ("lora_compiled", TrainConfig(method="lora", gradient_checkpointing=True, loss_chunk_size=CHUNK,
                                  compile=True)),
)


def changed_fields(config: TrainConfig) -> dict:
    """The fields of ``config`` that differ from TrainConfig's defaults (as a JSON-able dict)."""
    default = TrainConfig()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(default, f.name)}


def run_config_step(ctx, config: TrainConfig) -> dict:
    """Time minift's step of ``config`` on the preset at the suite's (batch, seq_len), unpadded;
    the measured peak beside `estimate_memory` of the same fields."""
    cfg, sizes = ModelConfig.from_name(ctx.sizes.preset), ctx.sizes
    config = dataclasses.replace(config, micro_batch_size=sizes.batch)
    group = next(step_groups(make_data(cfg, config, sizes.batch, sizes.seq_len, False), config))[2]
    tokens = sizes.batch * sizes.seq_len
    row = {"train_config": changed_fields(config)}
    model = optimizer = stepper = None
    try:
        seed_everything(config.seed)
        with torch.device(ctx.device):
            model = build_model(cfg, config.method, torch.bfloat16, r=LORA_R)
        optimizer = make_optimizer(model, config)
        if config.optimizer_in_backward:
            from minift.optim.in_backward import StepInBackward
            stepper = StepInBackward(optimizer)
        objective = SFTObjective(config.loss_chunk_size)
        model.train()
        losses = []
        with step_switches(model, config, stepper):
            def step():
                losses.append(run_step(model, optimizer, objective, group, ctx.device, config, stepper)[0])
            row.update(measure_step(ctx, step, tokens,
                                    train_flops_per_token(cfg, sizes.seq_len, config.method)))
        row["first_loss"] = losses[0]
    except Exception as e:  # noqa: BLE001 - an OOM of one step leaves the others to run
        row["error"] = f"{type(e).__name__}: {e}"
    finally:
        model = optimizer = stepper = None
        _free(ctx.device)
    fields = {k: v for k, v in changed_fields(config).items() if k not in ("micro_batch_size", "method")}
    if fields.pop("compile", False):
        row["estimate_note"] = "compile=True is not traced: the estimate is the eager step's"
    from minift import estimate_memory
    row["estimate"] = estimate_memory(cfg, config.method, batch_size=sizes.batch, seq_len=sizes.seq_len,
                                      r=LORA_R, attention_mask=False, device=ctx.device.type,
                                      **fields).as_dict()
    return row


def part_feature_steps(ctx) -> dict:
    """Each of `FEATURE_STEPS` (offload, paging, compiled layers and their eager baseline)."""
    out = {"preset": ctx.sizes.preset, "batch": ctx.sizes.batch, "seq_len": ctx.sizes.seq_len,
           "lora_r": LORA_R}
    budget = ctx.seconds
    for name, config in FEATURE_STEPS:
        ctx.seconds = budget / len(FEATURE_STEPS) / 2  # half for building (and compiling), half timing
        out[name] = run_config_step(ctx, config)
    ctx.seconds = budget
    eager, compiled = out["lora_eager"], out["lora_compiled"]
    if eager.get("ms") and compiled.get("ms"):
        out["compiled_speedup"] = statistics.median(eager["ms"]) / statistics.median(compiled["ms"])
    return out


def part_attention(ctx) -> dict:
    """Attention at the preset's head shapes over the suite's batch: causal SDPA (unpadded), and a
    padded and a packed batch through the path the model takes on this device (FlexAttention with a
    block mask on CUDA), beside the same masks as a dense SDPA mask. Forward + backward where the
    backend has a backward (flex has none on CPU: forward only there)."""
    cfg, sizes = ModelConfig.from_name(ctx.sizes.preset), ctx.sizes
    b, t, h, kv, d = sizes.batch, sizes.seq_len, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    cuda = ctx.device.type == "cuda"

    def qkv(grad: bool):
        g = torch.Generator(device=ctx.device).manual_seed(0)
        return [torch.randn(b, n, t, d, device=ctx.device, dtype=torch.bfloat16, generator=g).requires_grad_(grad)
                for n in (h, kv, kv)]

    padding = torch.ones(b, t, dtype=torch.long, device=ctx.device)
    padding[0, t - t // 4:] = 0  # a quarter of the first row is padding
    segments = (torch.arange(t, device=ctx.device) // max(1, t // 3)).expand(b, t).contiguous()
    masks = {"causal": lambda flex: None,
             "padded": lambda flex: batch_mask(t, 0, padding, None, None, ctx.device, flex),
             "packed": lambda flex: batch_mask(t, 0, None, segments, None, ctx.device, flex)}
    out = {"batch": b, "seq_len": t, "heads": h, "kv_heads": kv, "head_dim": d}
    share = ctx.seconds / 8
    for name, make in masks.items():
        for flex in ((False,) if name == "causal" else (True, False)):
            label = name if name == "causal" else f"{name}_{'flex' if flex else 'dense'}"
            row = {"mask_ms": ctx.clock.times_ms(lambda: make(flex), share / 4)}
            backward = cuda or not flex
            row.update(_time_attention(ctx, qkv(backward), make(flex), backward, share))
            out[label] = row
            _free(ctx.device)
    return out


def _time_attention(ctx, qkv, mask, backward: bool, seconds: float) -> dict:
    q, k, v = qkv

    def run():
        o = attend(q, k, v, mask)
        if backward:
            o.backward(torch.ones_like(o))

    with warnings.catch_warnings():  # flex's eager CPU path warns that it is unfused
        warnings.simplefilter("ignore", UserWarning)
        return {"mask_kind": type(mask).__name__, "backward": backward,
                "ms": ctx.clock.times_ms(run, seconds)}
