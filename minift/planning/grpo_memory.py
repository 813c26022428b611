"""The memory of a GRPO step by stage: rollout, scoring, update, traced or measured.

A GRPO step (``minift.objectives.grpo``) runs three stages, one after the other, and its peak is
the largest of theirs:

* **rollout**: the policy samples G completions per prompt (``minift.models.generation``: no
  graph, a KV cache of the N = P x G sequences grown token by token, the last position's
  logits and sampling buffers of each step);
* **scoring**: the reference's per-token log-probs of the sampled tokens (no graph; with full
  fine-tuning a frozen copy of the weights is alive through every stage);
* **update**: the policy's per-token log-probs with their graph, the GRPO loss, the backward,
  the optimizer step (``minift.training.loop.run_step``: the step computes the reference's
  log-probs again first, as ``minift.train`` does).

Every stage is counted by a `MemoryTracker` of its own, on the model prepared as
``minift.planning.trace.build_model`` prepares it, in the steady state: the update runs first,
so the optimizer states exist (as from the second step of a run on) and are counted in the
rollout and scoring stages too. The update and scoring stages replay one fixed rollout (token
ids that fill every completion to ``new_tokens``: no row ends early, the most memory).

``fake=True`` runs all of it on fake tensors (``torch._subclasses.FakeTensorMode``: shapes and
dtypes only, so Llama-3.1-8B plans on a laptop); the rollout then runs generation's decode loop
for ``new_tokens`` steps (a fake tensor has no values to tell whether every row has ended).
``fake=False`` runs the same stages on real tensors, the rollout through
``minift.models.generation.generate`` with no end-of-sequence id (every row runs to
``new_tokens``): what tests/test_grpo_memory.py compares the trace with.
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

from minift.checks import check_choice, check_int
from minift.distributed import parallel as mdist
from minift.memory.tracker import MemoryTracker
from minift.models.config import ModelConfig
from minift.models.generation import _pick, generate
from minift.models.llama import KVCache
from minift.names import IGNORE_INDEX
from minift.objectives import grpo
from minift.planning.trace import _warm_caches, build_model, resolve_config, targets_of
from minift.tracing import planning
from minift.training.config import TrainConfig
from minift.training.loop import run_step, step_switches
from minift.training.setup import make_optimizer, seed_everything

STAGES = ("rollout", "scoring", "update")


@dataclass
class GRPOTrace:
    """The stages of one GRPO step: a tracker report each, and the KV cache in closed form."""

    stages: dict  # stage name -> MemoryReport
    kv_cache: int  # bytes of the rollout's KV cache at its longest (closed form, ``kv_cache_bytes``)
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.stages.values())

    def as_dict(self) -> dict:
        return {"stages": {k: r.as_dict() for k, r in self.stages.items()}, "peak": int(self.peak),
                "kv_cache": int(self.kv_cache), "trace_seconds": round(self.seconds, 2),
                "settings": self.settings}


def kv_cache_bytes(cfg: ModelConfig, sequences: int, length: int, dtype: torch.dtype) -> int:
    """Keys and values of ``sequences`` rows of ``length`` positions in every decoder layer:
    2 x layers x sequences x length x key-value heads x head_dim x bytes per element."""
    per = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * sequences * length * cfg.num_key_value_heads * cfg.head_dim * per


def replayed_rollout(vocab: int, prompts: int, group: int, prompt_len: int, new_tokens: int) -> tuple:
    """(prompt micro-batch, rollout) of real token ids: ``prompts`` prompts of ``prompt_len``
    tokens, each with ``group`` completions of ``new_tokens`` tokens, none ended early, and
    rewards that differ within every group (non-zero advantages)."""
    ids = torch.tensor([[(7 * i + j) % vocab for j in range(prompt_len)] for i in range(prompts)])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "row_index": list(range(prompts)),
             "rows": [{} for _ in range(prompts)], "sample_seed": 0}
    n = prompts * group
    completion = torch.tensor([[(5 * i + 3 * j + 1) % vocab for j in range(new_tokens)] for i in range(n)])
    full = torch.cat([ids.repeat_interleave(group, 0), completion], dim=1)
    labels = torch.cat([torch.full((n, prompt_len), IGNORE_INDEX), completion], dim=1)
    rollout = {"input_ids": full, "attention_mask": torch.ones_like(full), "labels": labels,
               "rewards": (torch.arange(n) % 2).float(), "lengths": torch.full((n,), new_tokens)}
    return batch, rollout


def decode(model, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, temperature: float,
           top_p: float, pad_id: int) -> torch.Tensor:
    """``minift.models.generation``'s decode loop for exactly ``new_tokens`` steps (no row ends):
    what a trace runs in generate's place, on tensors without values to stop on."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = KVCache(model.config.num_hidden_layers)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            step_ids, step_pos, out = ids, positions, [ids]
            for i in range(new_tokens):
                logits = model(step_ids, attention_mask=mask, position_ids=step_pos, kv_cache=cache)
                token = _pick(logits[:, -1].float(), temperature, top_p, None)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                out.append(token[:, None])
                if i == new_tokens - 1:
                    break
                step_ids = token[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


def trace_grpo_step(config_or_preset: Union[ModelConfig, str], config: Optional[TrainConfig] = None, *,
                    prompts: int = 1, prompt_len: int = 64, new_tokens: Optional[int] = None,
                    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, r: int = 16,
                    target_modules="all-linear", adapter_dtype: torch.dtype = torch.float32,
                    fake: bool = True) -> GRPOTrace:
    """The rollout, scoring and update stages of one GRPO step of ``config`` (objective "grpo";
    its micro_batch_size is replaced by ``prompts``, its grpo_max_new_tokens by ``new_tokens``
    when given) on a model of ``config_or_preset``'s shape, on ``device``'s code path.

    Each prompt is ``prompt_len`` tokens and gets ``config.grpo_group_size`` completions of
    ``new_tokens`` tokens: the update trains sequences of prompt_len + new_tokens tokens.
    ``fake=False`` runs the stages on real tensors (the CPU path only).
    """
    cfg = resolve_config(config_or_preset)
    config = config if config is not None else TrainConfig(objective="grpo")
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a minift.TrainConfig, got {type(config).__name__}")
    prompts = check_int("prompts", prompts, error=TypeError)
    prompt_len = check_int("prompt_len", prompt_len, error=TypeError)
    new_tokens = check_int("new_tokens", config.grpo_max_new_tokens if new_tokens is None else new_tokens,
                           error=TypeError)
    device = check_choice("device", device, ("cuda", "cpu"))
    if prompt_len + new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt_len + new_tokens = {prompt_len + new_tokens} is more than the model's "
                         f"max_position_embeddings ({cfg.max_position_embeddings})")
    if not fake and device != "cpu":
        raise ValueError("stages on real tensors run the CPU path only (device='cpu')")
    for name in ("compile", "gradient_checkpointing", "activation_offload", "optimizer_in_backward",
                 "fsdp_cpu_offload"):
        if getattr(config, name):
            raise ValueError(f"{name} is not traced for objective='grpo'; trace without it")
    config = dataclasses.replace(config, objective="grpo", micro_batch_size=prompts,
                                 grpo_max_new_tokens=new_tokens)
    group = config.grpo_group_size
    started = time.perf_counter()
    batch, rollout = replayed_rollout(cfg.vocab_size, prompts, group, prompt_len, new_tokens)
    mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    cpu = torch.device("cpu")
    stages = {}
    with planning(device), mode, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        _warm_caches()
        seed_everything(config.seed)
        model = build_model(cfg, config.method, dtype, r=r, target_modules=targets_of(target_modules),
                            adapter_dtype=adapter_dtype)
        objective = grpo.objective_for(model, config, lambda p, c, rows: [0.0] * len(c))
        objective.rollout = lambda *args, **kwargs: rollout  # the sampled tokens, replayed
        optimizer = make_optimizer(model, config)
        frozen = objective.frozen_models()
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        gc.collect()  # what a stage frees, it frees where the code says, not when the collector runs
        gc.disable()
        try:
            # the update first: it creates the optimizer states, alive in every later step's stages
            tracker = MemoryTracker(model, optimizer, frozen=frozen)
            with step_switches(model, config, None, compile_layers=False), tracker.track():
                run_step(model, optimizer, objective, [batch], cpu, config,
                         clip=lambda: mdist.clip_grad_norm_on_device(params, config.max_grad_norm or math.inf))
            stages["update"] = tracker.report()
            tracker = MemoryTracker(model, optimizer, frozen=frozen)
            with tracker.track():
                objective.reference_logps(rollout, config.bf16)
            stages["scoring"] = tracker.report()
            prompt = batch["input_ids"].repeat_interleave(group, 0)
            pmask = torch.ones_like(prompt)
            tracker = MemoryTracker(model, optimizer, frozen=frozen)
            with tracker.track(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                if fake:
                    decode(model, prompt, pmask, new_tokens, config.grpo_temperature, 1.0, config.pad_id)
                else:
                    generate(model, prompt, new_tokens, temperature=config.grpo_temperature,
                             eos_token_id=[], pad_token_id=config.pad_id, attention_mask=pmask,
                             generator=torch.Generator().manual_seed(0))
            stages["rollout"] = tracker.report()
        finally:
            gc.enable()
    for report in stages.values():
        report.device = device
    name = config_or_preset if isinstance(config_or_preset, str) else cfg.model_type
    settings = dict(model=name, method=config.method, prompts=prompts, group_size=group,
                    sequences=prompts * group, prompt_len=prompt_len, new_tokens=new_tokens,
                    r=r if config.method != "full" else None, dtype=str(dtype).replace("torch.", ""),
                    device=device, optimizer=config.optimizer, kl_beta=config.grpo_kl_beta,
                    loss_chunk_size=config.loss_chunk_size)
    kv_dtype = torch.bfloat16 if config.bf16 else dtype  # autocast's projections are bf16
    return GRPOTrace(stages={k: stages[k] for k in STAGES},
                     kv_cache=kv_cache_bytes(cfg, prompts * group, prompt_len + new_tokens, kv_dtype),
                     seconds=time.perf_counter() - started, settings=settings)
