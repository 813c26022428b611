"""The training loop: one function, `train`, driven by one flat dataclass, `TrainConfig`.

The model arrives prepared (full, LoRA-wrapped, or NF4-quantized + LoRA-wrapped); the loop only
trains whatever has ``requires_grad``. One optimizer step = up to ``grad_accum`` micro-batches
whose summed token losses are divided by the number of trained tokens of the whole step, so the
gradient does not depend on how a step is split into micro-batches. The objective — the token
loss (``minift.objectives.sft``) or DPO (``minift.objectives.dpo``) — computes the step and the evaluation; the loop
does the rest: schedule, clipping, optimizer, logging, checkpoints, torchrun's side
(``minift.distributed.run``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from minift.checkpoints import steps as ckpt
from minift.distributed import parallel as mdist
from minift.distributed.parallel import reshard, unwrap
from minift.distributed.run import DistRun
from minift.files import reporting_write_errors, write_json
from minift.lora.layer import trainable_parameters
from minift.memory.tracker import MemoryTracker
from minift.models.switches import gradient_checkpointing, mlp_tiling, offloading, shifted_sparse_attention
from minift.objectives import grpo
from minift.objectives.dpo import DPOObjective, objective_for
from minift.objectives.sft import SFTObjective
from minift.optim.in_backward import StepInBackward
from minift.placement import default_device
from minift.tracing import known_all
from minift.training import rundir
from minift.training.compile import compiled_layers
from minift.training.config import DATA_ORDER_BEFORE, DATA_ORDER_FIELDS, TrainConfig
from minift.training.schedule import Schedule, batch_rows, epoch_batches, step_groups, total_steps
from minift.training.setup import make_optimizer, neftune, peak_memory, seed_everything


# ---- the run's state ---------------------------------------------------------------------
@dataclass
class RunState:
    """What a checkpoint must carry to continue the run exactly; saved in trainer_state.json.

    batch_tokens / batch_slots are the real tokens and (B, T) slots of the micro-batches seen, for
    the run's padding efficiency. batch_tokens counts what `tokens` counts, but the two are
    restored together, so a checkpoint written before batch_slots existed resumes to 0 / 0 here
    instead of a ratio of a restored count over a fresh one.
    """

    step: int = 0
    epoch: int = 0              # where the data order continues: micro-batch batch_index of epoch
    batch_index: int = 0
    epochs_done: float = 0.0
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    tokens: int = 0             # real (non-pad) tokens of all steps
    trained_tokens: int = 0     # label positions the loss counted
    train_time: float = 0.0
    timed_tokens: int = 0       # tokens and time of the untracked steps, for tokens/s
    timed_time: float = 0.0
    batch_tokens: int = 0
    batch_slots: int = 0
    evals: list = field(default_factory=list)

    @classmethod
    def from_saved(cls, saved: dict) -> "RunState":
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})

    def record(self, line: dict, seconds: float, slots: int, timed: bool) -> None:
        """Count one finished step (its metrics line) into the totals."""
        self.step, self.last_loss = line["step"], line["loss"]
        self.first_loss = line["loss"] if self.first_loss is None else self.first_loss
        self.tokens += line["tokens"]
        self.trained_tokens += line["trained_tokens"]
        self.train_time += seconds
        self.batch_tokens += line["tokens"]
        self.batch_slots += slots
        if timed:  # the tracked first step is slowed by tracking and one-time warm-up
            self.timed_tokens += line["tokens"]
            self.timed_time += seconds


# ---- resume ------------------------------------------------------------------------------
def tidy(output_dir) -> None:
    """`rundir.clean_leftovers` on rank 0 only, the other ranks waiting for it: under torchrun two
    ranks renaming or deleting one folder race, and one of them meets a FileNotFoundError."""
    if mdist.is_main():
        rundir.clean_leftovers(output_dir)
    mdist.barrier()


def check_resume(config: TrainConfig, model, data) -> Optional[str]:
    """The checkpoint `config.resume_from` names, after checking it fits this run.

    Raises ValueError (FileNotFoundError for a missing path) naming what differs: another
    method, model shape, frozen base (LoRA/QLoRA checkpoints record a fingerprint of it), data
    order or training data. Returns None when the config does not resume.
    """
    if not config.resume_from:
        return None
    tidy(config.output_dir)  # a complete .tmp-step-N may be the newest checkpoint
    path = ckpt.resolve_checkpoint(config.resume_from, Path(config.output_dir))
    # "full" checkpoints hold the whole model, so any base is overwritten on resume
    base = ckpt.base_fingerprint(model) if config.method != "full" else None
    state = ckpt.read_trainer_state(path)
    if isinstance(state.get("config"), dict):  # written before a data-order field existed
        state["config"] = {**DATA_ORDER_BEFORE, **state["config"]}
    ckpt.check_compatible(state, path, method=config.method, model=model,
                          config=config.to_dict(), fields=DATA_ORDER_FIELDS,
                          data=ckpt.data_fingerprint(data), base=base)
    _check_skips(state, path, config)
    return path


def _check_skips(state: dict, path, config: TrainConfig) -> None:
    """Steps may be added to skip_steps after the checkpoint's step, never before it: the steps
    it already ran must stay what they were, or the resumed run is no continuation."""
    done = int(state.get("step", 0))
    before = [s for s in state.get("config", {}).get("skip_steps", ()) if s <= done]
    now = [s for s in config.skip_steps if s <= done]
    if before != now:
        raise ValueError(f"{path}: the checkpoint ran steps 1..{done} skipping {before or 'none'}; "
                         f"skip_steps={list(config.skip_steps)} changes that; only steps after "
                         f"{done} can be added")


# ---- the loop ----------------------------------------------------------------------------
def train(model, train_data, config: TrainConfig, eval_data=None, *, reward_fn=None, tokenizer=None) -> dict:
    """Fine-tune `model` on `train_data`; write metrics, checkpoints and a summary.

    Args:
        model: a prepared model (full, LoRA-wrapped, or quantized + LoRA-wrapped) whose forward
            takes the batch keys (input_ids, attention_mask, ...) and returns logits (B, T, V).
        train_data: tokenized examples, each {"input_ids": [...], "labels": [...]}.
        config: a TrainConfig.
        eval_data: optional held-out examples; evaluated every eval_interval steps and at the end.
        reward_fn: objective="grpo" only: reward_fn(prompts, completions, rows) -> list[float], one
            reward per completion (``minift.objectives.rewards`` has rule rewards). train_data and
            eval_data are then prompt rows: {"prompt": text} or {"input_ids": ids}, plus any keys
            the reward reads ("answer").
        tokenizer: objective="grpo": tokenizes "prompt" text and decodes completions for
            reward_fn (without it, ids are passed).

    Returns:
        The summary dict, also written to ``<output_dir>/summary.json``.

    Raises:
        FloatingPointError: a step's loss or gradient norm is NaN/Inf; nothing is saved, and the
            message names the checkpoint to go back to (minift.training.rundir.divergence).
        ValueError: bad data or token ids, a method that does not match what is trainable, another
            run's output_dir, or a resume checkpoint from another method, model or data order.
    """
    if config.objective == "grpo":
        if not callable(reward_fn):
            raise ValueError("objective='grpo' needs reward_fn=(prompts, completions, rows) -> list[float]")
        train_data = grpo.prompt_rows(train_data, tokenizer, "train_data")
        eval_data = None if eval_data is None else grpo.prompt_rows(eval_data, tokenizer, "eval_data")
    elif reward_fn is not None:
        raise ValueError(f"reward_fn is for objective='grpo'; this config trains objective='{config.objective}'")
    else:
        check = DPOObjective.check if config.objective == "dpo" else SFTObjective.check
        check(train_data, "train_data")
        if eval_data is not None:
            check(eval_data, "eval_data")
    run = _Run(model, train_data, config, eval_data, (reward_fn, tokenizer))
    model, st, opt = run.model, run.state, run.optimizer  # model: FSDP/DDP-prepared under torchrun
    with run.session() as log:
        groups = step_groups(train_data, config, st.epoch, st.batch_index)
        while st.step < run.total:
            position, epochs_done, group = next(groups)
            step = st.step + 1
            if step in config.skip_steps:  # passed over untrained (a batch that gave NaN)
                run.skip(step, group, position, epochs_done, log)
                continue
            # 1. learning rate of this step
            lr = run.schedule.lr(step - 1)
            for g in opt.param_groups:
                g["lr"] = lr
            # first step only; the tracker counts one process's tensors, not a sharded model's
            tracker = (MemoryTracker(model, opt, frozen=run.objective.frozen_models())
                       if run.memory is None and not run.dist.active else None)
            t0 = time.perf_counter()
            run.dist.begin_step(step)
            with tracker.track() if tracker else contextlib.nullcontext():
                loss, norm, n_trained, extra, finite = run_step(
                    model, opt, run.objective, group, run.device, config, run.stepper,
                    clip=lambda: run.dist.clip(run.params, config.max_grad_norm or math.inf),
                    shard=run.dist.shard)
            seconds = time.perf_counter() - t0
            run.dist.end_step()
            if not finite:
                run.stop_non_finite(step, loss, norm, group)
            if tracker is not None:
                run.report_memory(tracker.report())
            # 6. log: totals, the metrics line, the progress bar
            st.epoch, st.batch_index = position
            st.epochs_done = epochs_done
            line = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm,
                    "tokens": sum(int(b["attention_mask"].sum()) for b in group),
                    "trained_tokens": n_trained, **extra}
            line["tokens_per_s"] = line["tokens"] / seconds
            st.record(line, seconds, sum(b["attention_mask"].numel() for b in group),
                      timed=tracker is None)
            line.update(elapsed=st.train_time, epoch=round(epochs_done, 4))
            # 7. evaluate and save on their intervals
            if eval_data is not None and config.eval_interval and step % config.eval_interval == 0:
                line["eval_loss"] = run.evaluate()["eval_loss"]
            run.log(line, log)
            if config.save_interval and step % config.save_interval == 0:
                run.save()
        run.finish()
    return run.write_summary()


def run_step(model, optimizer, objective, group: list, device, config: TrainConfig, stepper=None,
             clip=None, shard=None):
    """One optimizer step: forward/backward over the step's micro-batches (the objective
    normalises; with optimizer_in_backward each parameter is stepped there and its gradient
    freed), the clipped gradient norm, the optimizer step on finite gradients, the gradients
    dropped. Under torchrun ``shard`` names this rank's share. A planning trace
    (``minift.planning.trace``) runs exactly this on fake tensors.

    The step waits for the device once: the loss, the gradient norm (``clip`` returns it as a
    device tensor) and the objective's tensor metrics are read together, after the backward and
    before the optimizer step, whose skip on a non-finite loss or norm is the decision that needs
    them. Nothing else in forward, backward or the optimizer step reads a device value
    (tests/test_step_syncs.py counts it).

    Returns (loss, grad norm, trained tokens, extra metrics, finite).
    """
    if stepper:
        stepper.reset()
    loss, n_trained, extra = objective.step(model, group, device, config.bf16, shard=shard)
    if stepper:
        norm = stepper.grad_norm()
    elif clip is not None:
        norm = clip()
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        norm = mdist.clip_grad_norm_on_device(params, config.max_grad_norm or math.inf)
    # the step's one read; a planning trace has no values and assumes finite
    keys = list(extra)
    loss, norm, *values = known_all([loss, norm, *extra.values()], 0.0)
    extra = dict(zip(keys, values))
    finite = math.isfinite(loss) and math.isfinite(norm)
    if finite and not stepper:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, n_trained, extra, finite


@contextlib.contextmanager
def step_switches(model, config: TrainConfig, stepper=None, compile_layers: bool = True):
    """The model switches a run's steps take: gradient checkpointing, compiled layers, activation
    offload, MLP tiles, S²-Attn, the optimizer step in backward and NEFTune; ``model`` is the plain
    Llama (inside DDP's wrapper; FSDP2 shards in place)."""
    with gradient_checkpointing(model, config.gradient_checkpointing), \
            compiled_layers(model, config.compile if compile_layers else False), \
            offloading(model, config.activation_offload), \
            mlp_tiling(model, config.mlp_tile_size), \
            shifted_sparse_attention(model, config.s2_attention, config.s2_group_size), \
            stepper or contextlib.nullcontext(), \
            neftune(model, config.neftune_alpha):
        yield


class _Run:
    """The resources of one `train` call (device, optimizer, schedule, output files, progress
    bar) and the phases around the loop's step: resume, evaluation, saving, the summary."""

    def __init__(self, model, train_data, config: TrainConfig, eval_data, rewards=(None, None)):
        self.dist = DistRun(config)  # joins the process group under torchrun; else inactive
        self.data, self.config, self.eval_data = train_data, self.dist.config, eval_data
        config = self.config
        self.device = self.dist.device or default_device(config.device)
        self.out = Path(config.output_dir)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        tidy(self.out)  # of a killed run: partial saves, temporary files
        rundir.check_run(model, train_data, eval_data, config)
        seed_everything(config.seed)
        if not self.dist.active:  # one process: on the device before the fingerprint pass
            model.to(self.device)
        self.data_fp = ckpt.data_fingerprint(train_data)
        # Adapter checkpoints rely on the frozen base they were trained on; "full" checkpoints
        # hold the whole model. Taken once (the base is frozen), before any sharding.
        self.base_fp = ckpt.base_fingerprint(model) if config.method != "full" else None
        self.counts = trainable_parameters(model)  # NF4 weights by their logical size
        # before any checkpoint is loaded: a DPO reference is the model as it was passed in
        if config.objective == "grpo":
            self.objective = grpo.objective_for(model, config, *rewards)
        elif config.objective == "dpo":
            self.objective = objective_for(model, config, train_data, eval_data, distributed=self.dist.active)
        else:
            self.objective = SFTObjective(config.loss_chunk_size)
        self.resumed = check_resume(config, model, train_data)
        self.model = model = self.dist.prepare(model, self.device)
        if self.dist.active:  # a frozen reference copy sharded like the model, log-probs scored
            self.objective.distribute(self.dist.shard, self.dist.place_frozen)
            reshard(model)  # the optimizer must get the sharded parameters, not a gathered root's
        self.optimizer = make_optimizer(model, config)
        self.stepper = StepInBackward(self.optimizer) if config.optimizer_in_backward else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state = RunState()
        if self.resumed:
            saved = self.dist.load(self.resumed, model=model, optimizer=self.optimizer, method=config.method)
            self.state = RunState.from_saved(saved)
        # checkpoints of this run carry its id: pruning leaves any other run's alone
        self.run_id = saved.get("run_id") if self.resumed else rundir.new_run_id()
        # GRPO's loss is no cross-entropy (ln(vocab) means nothing) and a zero gradient is normal
        online_rl = config.objective == "grpo"
        self.watch = rundir.DeadModelWatch(None if online_rl else rundir.vocab_size_of(model),
                                           zero_norm_can_be_fine=online_rl)
        self.saved_at = self.state.step if self.resumed else None
        self.last_path, self.memory = self.resumed, None
        self.total = total_steps(train_data, config)
        self.schedule = Schedule.from_ratio(config.learning_rate, self.total, config.warmup_ratio,
                                            config.lr_scheduler)

    def step(self, group: list):
        """(loss, trained tokens, extra metrics) of one step: the objective's; under torchrun it
        runs this rank's share of ``group`` and returns the numbers of all ranks."""
        return self.objective.step(self.model, group, self.device, self.config.bf16, shard=self.dist.shard)

    @contextlib.contextmanager
    def session(self):
        """Metrics file, progress bar, gradient checkpointing and NEFTune for the loop's span."""
        metrics = self.out / "metrics.jsonl"
        if self.dist.is_main:  # the other ranks write no files but their checkpoint shards
            if self.resumed:  # a crashed run may have logged past the checkpoint we resume from
                rundir.trim_metrics(metrics, self.state.step)
            else:
                metrics.write_text("")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.bar = tqdm(total=self.total, initial=self.state.step, unit="step", dynamic_ncols=True,
                        disable=not (self.config.progress and sys.stdout.isatty() and self.dist.is_main))
        self.model.train()
        plain = unwrap(self.model)  # the Llama inside a DDP wrapper (FSDP2 shards in place)
        try:
            with step_switches(plain, self.config, self.stepper), \
                    open(metrics if self.dist.is_main else os.devnull, "ab", buffering=0) as log:
                yield log
        finally:
            self.bar.close()
            self.dist.close()

    def stop_non_finite(self, step: int, loss: float, norm: float, group: list) -> None:
        # nothing is saved: the weights after step - 1 gave this loss, so they are no good state,
        # unless the step's own data is to blame (finite weights, non-finite on these rows only)
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        rows = batch_rows(self.data, self.config, self.state.epoch, self.state.batch_index, len(group))
        if self._data_to_blame(group):
            raise FloatingPointError(rundir.bad_batch(self.out, step, what, value, rows, self.state.epoch))
        partial = "" if not self.stepper else (
            " (optimizer_in_backward: every parameter was already updated in backward, those with "
            f"non-finite gradients too: {', '.join(self.stepper.nonfinite[:3]) or 'none'})")
        raise FloatingPointError(rundir.divergence(self.out, step, what, value, rows) + partial)

    def _data_to_blame(self, group: list) -> bool:
        """Whether the weights give a finite loss on another micro-batch of this epoch but not on
        one of this step's: then the step's rows, not the weights, made it non-finite. Only on
        one process without optimizer_in_backward (whose step has already changed weights)."""
        if self.stepper or self.dist.active:
            return False
        batches = epoch_batches(self.data, self.config, self.state.epoch)
        start, end = self.state.batch_index, self.state.batch_index + len(group)
        others = batches[:start][-1:] + batches[end:end + 1]
        if not others:
            return False
        finite = self.objective.finite_on
        return finite(self.model, others[0], self.device, self.config) and \
            not all(finite(self.model, b, self.device, self.config) for b in group)

    def skip(self, step: int, group: list, position, epochs_done: float, log) -> None:
        """Pass over step `step`'s micro-batches (TrainConfig.skip_steps): no forward, no update;
        the data position moves on as if it had trained, so the steps after it are unchanged."""
        st = self.state
        rows = batch_rows(self.data, self.config, st.epoch, st.batch_index, len(group))
        st.epoch, st.batch_index = position
        st.epochs_done, st.step = epochs_done, step
        rundir.append_metrics(log, {"step": step, "skipped": True, "rows": rows}, self.out / "metrics.jsonl")
        self.bar.update(1)
        self.say(f"step {step}/{self.total} skipped (skip_steps): rows {rows} of train_data")
        if self.config.save_interval and step % self.config.save_interval == 0:
            self.save()

    def report_memory(self, report) -> None:
        self.memory = report.as_dict()
        self.say(report.table() + f"\n(peak: tensors alive in the first step; the step lines show "
                 f"{rundir.peak_label(self.device)})")

    def log(self, line: dict, log) -> None:
        rundir.append_metrics(log, line, self.out / "metrics.jsonl")
        self.bar.update(1)
        step = line["step"]
        dead = self.watch.update(step, line["loss"], line["grad_norm"])
        if dead:
            warnings.warn(dead, stacklevel=2)
        if step % self.config.log_interval == 0 or step == self.total:
            peak, label = f"{peak_memory(self.device) / 2**20:.0f}MiB", rundir.peak_label(self.device)
            self.bar.set_postfix({"loss": f"{line['loss']:.4f}", "lr": f"{line['lr']:.2e}",
                                  "tok/s": f"{line['tokens_per_s']:.0f}", label: peak}, refresh=False)
            if self.bar.disable:
                self.say(f"step {step}/{self.total} loss {line['loss']:.4f} lr {line['lr']:.2e} "
                         f"tok/s {line['tokens_per_s']:.0f} {label} {peak}")

    def say(self, text: str) -> None:
        if self.config.progress and self.dist.is_main:
            (print if self.bar.disable else self.bar.write)(text)

    def evaluate(self) -> dict:
        result = dict(self.objective.evaluate(self.model, self.eval_data, self.config, self.device,
                                              shard=self.dist.shard), step=self.state.step)
        if self.dist.active:
            reshard(self.model)  # a forward without backward leaves FSDP's root unit gathered
        self.state.evals.append(result)
        return result

    def save(self, rng=None) -> str:
        trainer_state = dict(dataclasses.asdict(self.state), config=self.config.to_dict(),
                             run_id=self.run_id, data=self.data_fp, base=self.base_fp,
                             total_steps=self.total)
        save = self.dist.save if self.dist.active else ckpt.save_checkpoint
        path = save(self.out, self.state.step, model=self.model,
                                    optimizer=self.optimizer, method=self.config.method,
                                    trainer_state=trainer_state, keep_last=self.config.keep_last,
                                    rng=rng)
        self.last_path, self.saved_at = path, self.state.step
        return path

    def finish(self) -> None:
        """The final evaluation and checkpoint, unless the last step already wrote them."""
        evals = self.state.evals
        if self.eval_data is not None and (not evals or evals[-1]["step"] != self.state.step):
            self.evaluate()
        if self.saved_at != self.state.step:
            self.save()

    def write_summary(self) -> dict:
        summary = self.summary()
        if summary["padding_efficiency"] is not None:
            self.say(f"padding efficiency {summary['padding_efficiency']:.1%} (real tokens / "
                     f"slots of the padded micro-batches of all {summary['steps']} steps)")
        if self.dist.is_main:
            path = self.out / "summary.json"
            with reporting_write_errors(f"cannot write {path}", self.out,
                                        then=lambda err: ckpt.resume_hint(self.out, err)):
                write_json(path, summary)  # atomic: a kill keeps the last summary
        return summary

    def summary(self) -> dict:
        st, config = self.state, self.config
        trainable, total = self.counts
        return {
            "method": config.method, "objective": config.objective, "steps": st.step, "total_steps": self.total,
            "epochs": round(st.epochs_done, 4), "first_loss": st.first_loss,
            "last_loss": st.last_loss, "eval_loss": st.evals[-1]["eval_loss"] if st.evals else None,
            "eval": st.evals, "tokens": st.tokens, "trained_tokens": st.trained_tokens,
            "train_time_s": st.train_time,
            "tokens_per_s": (st.timed_tokens / st.timed_time if st.timed_time else
                             st.tokens / st.train_time if st.train_time else None),
            "padding_efficiency": st.batch_tokens / st.batch_slots if st.batch_slots else None,
            "trainable_params": trainable, "total_params": total,
            "peak_memory_bytes": peak_memory(self.device),
            "peak_memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "process_max_rss",
            "memory": self.memory, "device": str(self.device), "optimizer": config.optimizer,
            "checkpoint": self.last_path, "resumed_from": self.resumed, "output_dir": str(self.out),
            "world_size": self.dist.world_size, "parallel": self.dist.parallel,
        }
