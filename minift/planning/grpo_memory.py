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
from minift.memory.allocator import replay
from minift.memory.tracker import MemoryTracker
from minift.models.config import ModelConfig
from minift.models.generation import _pick, generate, next_logits
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
    reserved: Optional[int] = None  # the caching allocator's peak over a steady-state step (replayed)
    reserved_expandable: Optional[int] = None  # the same with expandable_segments:True

    @property
    def peak_stage(self) -> str:
        """The stage whose allocated peak is the step's (the first of STAGES on a tie)."""
        return max(STAGES, key=lambda k: (self.stages[k].peak, -STAGES.index(k)))

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.stages.values())

    def as_dict(self) -> dict:
        return {"stages": {k: r.as_dict() for k, r in self.stages.items()}, "peak": int(self.peak),
                "peak_stage": self.peak_stage, "reserved": self.reserved,
                "reserved_expandable": self.reserved_expandable,
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
           top_p: float, pad_id: int, skip_middle: bool = False) -> torch.Tensor:
    """``minift.models.generation``'s decode loop for exactly ``new_tokens`` steps (no row ends):
    what a trace runs in generate's place, on tensors without values to stop on.

    ``skip_middle`` runs the prefill, the first decode step and the last two: before the third step
    the KV cache jumps to the length it has before the second-to-last, one layer at a time (each
    layer's old tensors freed first), and the token columns of the skipped steps are made as the
    loop makes them. From the second decode step on, each step holds at least what the one before
    it held (a longer cache, a longer mask, one more token column, larger attention scores; the
    previous step's logits of one position), so the skipped steps do not hold the peak: the
    rollout's allocated peak and each category equal the whole loop's, which
    tests/test_grpo_memory.py checks. An 8B trace of hundreds of new tokens takes seconds instead
    of minutes.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            cache = KVCache(model.config.num_hidden_layers)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            step_ids, step_pos, out = ids, positions, [ids]
            i = 0
            while i < new_tokens:
                logits = next_logits(model, step_ids, mask, step_pos, cache)
                token = _pick(logits[:, -1].float(), temperature, top_p, None)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                out.append(token[:, None])
                if i == new_tokens - 1:
                    break
                step_ids = token[:, None]
                step_pos = step_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                i += 1
                if skip_middle and i == 2 and new_tokens > 4:
                    skip = new_tokens - 4  # steps 2 .. new_tokens - 3 are not run
                    # layer by layer, the old tensors freed first: the jump is no moment of the loop
                    for layer in range(len(cache.layers)):
                        k, v = cache.layers[layer]
                        shape, dtype, kv_device = (*k.shape[:2], k.shape[2] + skip, k.shape[3]), k.dtype, k.device
                        cache.layers[layer] = None
                        del k, v
                        cache.layers[layer] = tuple(torch.empty(shape, dtype=dtype, device=kv_device)
                                                    for _ in range(2))
                    out += [torch.full_like(token[:, None], pad_id) for _ in range(skip)]
                    step_pos = step_pos + skip
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1]).expand(-1, skip)], dim=1)
                    i += skip
            return torch.cat(out, dim=1)
    finally:
        model.train(was_training)


def trace_grpo_step(config_or_preset: Union[ModelConfig, str], config: Optional[TrainConfig] = None, *,
                    prompts: int = 1, prompt_len: int = 64, new_tokens: Optional[int] = None,
                    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, r: int = 16,
                    target_modules="all-linear", adapter_dtype: torch.dtype = torch.float32,
                    blocksize: int = 64, lm_head_nf4: bool = False, modules_to_save=None,
                    fake: bool = True, skip_middle: bool = True) -> GRPOTrace:
    """The rollout, scoring and update stages of one GRPO step of ``config`` (objective "grpo";
    its micro_batch_size is replaced by ``prompts``, its grpo_max_new_tokens by ``new_tokens``
    when given) on a model of ``config_or_preset``'s shape, on ``device``'s code path.

    Each prompt is ``prompt_len`` tokens and gets ``config.grpo_group_size`` completions of
    ``new_tokens`` tokens: the update trains sequences of prompt_len + new_tokens tokens.
    The model is prepared as `minift.planning.trace.build_model` does (``blocksize``,
    ``lm_head_nf4``, ``modules_to_save`` as there). ``fake=False`` runs the stages on real
    tensors (the CPU path only). A fake rollout skips the middle decode steps
    (``decode(skip_middle=True)``: the same allocated peak, in a fraction of the time) unless
    ``skip_middle=False``. The ``reserved`` figures replay one steady-state update, then the
    next step's rollout, scoring and update, through the caching allocator simulation
    (`minift.memory.allocator.replay`): what the rollout's KV cache leaves cached is reused later.
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
    for name in ("compile", "fsdp_cpu_offload"):  # as trace_step refuses them
        if getattr(config, name):
            raise ValueError(f"{name} is not traced for objective='grpo'; trace without it")
    config = dataclasses.replace(config, objective="grpo", micro_batch_size=prompts,
                                 grpo_max_new_tokens=new_tokens)
    group = config.grpo_group_size
    started = time.perf_counter()
    batch, rollout = replayed_rollout(cfg.vocab_size, prompts, group, prompt_len, new_tokens)
    mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    cpu = torch.device("cpu")
    with planning(device), mode, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        _warm_caches()
        seed_everything(config.seed)
        model = build_model(cfg, config.method, dtype, r=r, target_modules=targets_of(target_modules),
                            adapter_dtype=adapter_dtype, blocksize=blocksize, lm_head_nf4=lm_head_nf4,
                            modules_to_save=modules_to_save)
        objective = grpo.objective_for(model, config, lambda p, c, rows: [0.0] * len(c))
        objective.rollout = lambda *args, **kwargs: rollout  # the sampled tokens, replayed
        optimizer = make_optimizer(model, config)
        stepper = None
        if config.optimizer_in_backward:
            from minift.optim.in_backward import StepInBackward
            stepper = StepInBackward(optimizer)
        frozen = objective.frozen_models()
        params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        trackers = {}

        def tracked(stage):
            trackers[stage] = MemoryTracker(model, optimizer, frozen=frozen, record_events=True)
            return trackers[stage].track()

        gc.collect()  # what a stage frees, it frees where the code says, not when the collector runs
        gc.disable()
        try:
            # the update first: it creates the optimizer states, alive in every later step's stages
            with step_switches(model, config, stepper, compile_layers=False), tracked("update"):
                run_step(model, optimizer, objective, [batch], cpu, config, stepper,
                         clip=lambda: mdist.clip_grad_norm_on_device(params, config.max_grad_norm or math.inf))
            with tracked("scoring"):
                objective.reference_logps(rollout, config.bf16)
            prompt = batch["input_ids"].repeat_interleave(group, 0)
            pmask = torch.ones_like(prompt)
            with tracked("rollout"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                if fake:
                    decode(model, prompt, pmask, new_tokens, config.grpo_temperature, 1.0, config.pad_id,
                           skip_middle=skip_middle)
                else:
                    generate(model, prompt, new_tokens, temperature=config.grpo_temperature,
                             eos_token_id=[], pad_token_id=config.pad_id, attention_mask=pmask,
                             generator=torch.Generator().manual_seed(0))
        finally:
            gc.enable()
        stages = {k: t.report() for k, t in trackers.items()}
        # one steady-state update (weights, states, its step), then a whole step's stages in order
        sequence = trackers["update"].events() + [
            (e[0], (stage, e[1]), *e[2:]) for stage in STAGES for e in trackers[stage].step_events()]
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
                     seconds=time.perf_counter() - started, settings=settings,
                     reserved=replay(sequence)["max_reserved"],
                     reserved_expandable=replay(sequence, expandable_segments=True)["max_reserved"])

