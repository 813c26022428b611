"""The training loop: one function, `train`, driven by one flat dataclass, `TrainConfig`.

The model arrives prepared (full, LoRA-wrapped, or NF4-quantized + LoRA-wrapped); the loop only
trains whatever has ``requires_grad``. One optimizer step = up to ``grad_accum`` micro-batches
whose summed token losses are divided by the number of trained tokens of the whole step, so the
gradient does not depend on how a step is split into micro-batches.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from minift import checkpoint as ckpt
from minift.schedule import SCHEDULES, Schedule, step_groups, total_steps

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
BATCHING = ("bucket", "pack")
# Fields that fix which micro-batches make up step N; a resumed run must keep them.
DATA_ORDER_FIELDS = ("micro_batch_size", "grad_accum", "batching", "seed", "max_length", "pad_id")


@dataclass
class TrainConfig:
    """Everything the loop needs to know. Flat, with defaults; checked on construction.

    | field | default | meaning |
    |---|---|---|
    | method | "lora" | "full", "lora" or "qlora": what the checkpoints hold; recorded in summaries |
    | learning_rate | 2e-4 | peak learning rate (finite, > 0) |
    | warmup_ratio | 0.03 | fraction of the steps with linear warm-up, in [0, 1) |
    | lr_scheduler | "cosine" | decay after warm-up: "cosine", "linear" or "constant" |
    | epochs | 1 | passes over train_data (ignored when max_steps is set) |
    | max_steps | None | optimizer steps to run; None = as many as `epochs` take |
    | micro_batch_size | 4 | examples per forward/backward |
    | grad_accum | 1 | micro-batches per optimizer step |
    | max_grad_norm | 1.0 | clip the global gradient norm to this; None = no clipping |
    | bf16 | True | run forward/backward under bf16 autocast (CPU and CUDA) |
    | gradient_checkpointing | False | recompute each decoder layer in backward |
    | optimizer | "adamw" | "adamw" (torch), "adamw8bit" or "paged_adamw8bit" (minift.optim) |
    | weight_decay | 0.0 | decoupled weight decay on matrices (not on biases or norm weights) |
    | neftune_alpha | None | NEFTune noise on the token embeddings while training; None = off |
    | batching | "bucket" | "bucket" (similar lengths together) or "pack" (several samples per row) |
    | max_length | None | row length for "pack" batching (passed to minift.data.batch_examples) |
    | pad_id | 0 | token id used for padding (masked out, never trained) |
    | eval_interval | None | evaluate on eval_data every N steps (and always at the end) |
    | save_interval | None | write a checkpoint every N steps (and always at the end) |
    | log_interval | 1 | refresh the progress bar / print a log line every N steps |
    | keep_last | 2 | keep the newest K checkpoints; None keeps all |
    | output_dir | "runs/minift" | where metrics.jsonl, summary.json and step-N/ go |
    | seed | 0 | seeds torch/python/numpy and the data order (epoch e uses seed + e); in [0, 2**32) |
    | resume_from | None | None, "latest" (newest checkpoint in output_dir) or a checkpoint path |
    | device | None | "cuda", "cpu", ...; None = cuda when available, else cpu |
    | progress | True | show a progress bar (only when stdout is a terminal) and print reports |
    """

    method: str = "lora"
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    epochs: int = 1
    max_steps: Optional[int] = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    bf16: bool = True
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    neftune_alpha: Optional[float] = None
    batching: str = "bucket"
    max_length: Optional[int] = None
    pad_id: int = 0
    eval_interval: Optional[int] = None
    save_interval: Optional[int] = None
    log_interval: int = 1
    keep_last: Optional[int] = 2
    output_dir: str = "runs/minift"
    seed: int = 0
    resume_from: Optional[str] = None
    device: Optional[str] = None
    progress: bool = True

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("optimizer", OPTIMIZERS),
                              ("lr_scheduler", SCHEDULES), ("batching", BATCHING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TrainConfig.{name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")
        _check_number(self, "learning_rate", "> 0", lambda v: v > 0)
        _check_number(self, "warmup_ratio", "in [0, 1)", lambda v: 0 <= v < 1)
        _check_number(self, "weight_decay", ">= 0", lambda v: v >= 0)
        for name in ("max_grad_norm", "neftune_alpha"):
            if getattr(self, name) is not None:
                _check_number(self, name, "> 0 or None", lambda v: v > 0)
        for name in ("epochs", "micro_batch_size", "grad_accum", "log_interval"):
            _check_int(self, name, optional=False)
        for name in ("max_steps", "eval_interval", "save_interval", "keep_last", "max_length"):
            _check_int(self, name, optional=True)
        # numpy's generator takes seeds in [0, 2**32); checked here rather than at _seed_everything
        # so that a bad seed fails before any work.
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ValueError(f"TrainConfig.seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.batching == "pack" and self.max_length is None:
            raise ValueError("TrainConfig.max_length must be set when batching='pack' (the row length)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_number(cfg, name: str, rule: str, ok) -> None:
    # inf passes every "> 0" test and nan fails them silently in some spellings, so finiteness
    # is its own check: an infinite learning rate or clipping norm is never meant.
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not ok(value):
        raise ValueError(f"TrainConfig.{name} must be a finite number {rule}, got {value!r}")


def _check_int(cfg, name: str, optional: bool) -> None:
    value = getattr(cfg, name)
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        kind = "an integer >= 1 or None" if optional else "an integer >= 1"
        raise ValueError(f"TrainConfig.{name} must be {kind}, got {value!r}")


# ---- the loss ----------------------------------------------------------------------------
def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed fp32 cross-entropy of next-token predictions: logits[:, t] predicts labels[:, t+1]."""
    shifted = logits[:, :-1].float().reshape(-1, logits.size(-1))  # (B*(T-1), V)
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")


def trained_tokens(batch: dict) -> int:
    """Number of label positions that contribute to the loss (after the shift)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _batch_loss_sum(model, batch: dict, device, bf16: bool) -> torch.Tensor:
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = model(**inputs)  # (B, T, V)
    return token_loss_sum(logits, batch["labels"].to(device))


def accumulate_gradients(model, micro_batches: list, device, bf16: bool = False):
    """Forward/backward over one optimizer step's micro-batches.

    Each micro-batch's summed token loss is divided by the trained tokens of *all* micro-batches,
    so the accumulated gradient equals that of one big batch: 1 x 8 and 8 x 1 agree.

    Returns:
        (loss, n_trained): the step's mean token loss as a 0-dim tensor, and its trained tokens.
    """
    n_trained = sum(trained_tokens(b) for b in micro_batches)  # counted before any forward
    device = torch.device(device)
    total = torch.zeros((), device=device)
    for batch in micro_batches:
        loss = _batch_loss_sum(model, batch, device, bf16) / max(n_trained, 1)
        loss.backward()
        total += loss.detach()
    return total, n_trained


@torch.no_grad()
def evaluate(model, examples: list, config: TrainConfig, device=None) -> dict:
    """Mean token loss (and perplexity) of `examples`, in eval mode, with the training batching."""
    from minift.data import batch_examples

    device = torch.device(device or _pick_device(config))
    was_training = model.training
    model.eval()
    batches = batch_examples(examples, config.micro_batch_size, pad_id=config.pad_id,
                             mode=config.batching, max_length=config.max_length, shuffle=False)
    total = sum(float(_batch_loss_sum(model, b, device, config.bf16)) for b in batches)
    count = sum(trained_tokens(b) for b in batches)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}


# ---- set-up pieces -----------------------------------------------------------------------
def _pick_device(config: TrainConfig) -> torch.device:
    if config.device is not None:
        return torch.device(config.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters that require grad."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True; nothing to train")
    # Decay matrices only; biases and norm weights (1-D) keep their scale.
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.learning_rate)
    from minift import optim

    cls = optim.AdamW8bit if config.optimizer == "adamw8bit" else optim.PagedAdamW8bit
    return cls(groups, lr=config.learning_rate)


@contextlib.contextmanager
def _gradient_checkpointing(model, enabled: bool):
    holders = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if enabled and not holders:
        raise ValueError("TrainConfig.gradient_checkpointing=True, but no module of the model has a "
                         "'gradient_checkpointing' attribute")
    previous = [m.gradient_checkpointing for m in holders]
    for m in holders:
        m.gradient_checkpointing = enabled
    try:
        yield
    finally:
        for m, value in zip(holders, previous):
            m.gradient_checkpointing = value


@contextlib.contextmanager
def _neftune(model, alpha: Optional[float]):
    """NEFTune (Jain et al., 2023): uniform noise of scale alpha / sqrt(T * d) on the embeddings."""
    if alpha is None:
        yield
        return
    try:
        embed = model.get_submodule("model.embed_tokens")
    except AttributeError:
        raise ValueError("TrainConfig.neftune_alpha is set, but the model has no "
                         "'model.embed_tokens' module") from None

    def add_noise(module, inputs, output):  # output: (B, T, d)
        if not module.training:
            return output
        scale = alpha / math.sqrt(output.size(-2) * output.size(-1))
        return output + torch.empty_like(output).uniform_(-scale, scale)

    handle = embed.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource  # process peak RSS; ru_maxrss is in KiB on Linux

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _check_examples(examples, name: str) -> None:
    if not isinstance(examples, (list, tuple)) or not examples:
        raise ValueError(f"{name} must be a non-empty list of examples, got "
                         f"{'an empty list' if isinstance(examples, (list, tuple)) else type(examples).__name__}")
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "input_ids" not in ex or "labels" not in ex:
            raise ValueError(f"{name}[{i}] must be a dict with 'input_ids' and 'labels'")
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(f"{name}[{i}]: input_ids has {len(ex['input_ids'])} tokens but labels "
                             f"has {len(ex['labels'])}")


def _seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- the loop ----------------------------------------------------------------------------
def train(model, train_data, config: TrainConfig, eval_data=None) -> dict:
    """Fine-tune `model` on `train_data`; write metrics, checkpoints and a summary.

    Args:
        model: a prepared model (full, LoRA-wrapped, or quantized + LoRA-wrapped) whose forward
            takes the batch keys (input_ids, attention_mask, ...) and returns logits (B, T, V).
        train_data: tokenized examples, each {"input_ids": [...], "labels": [...]}.
        config: a TrainConfig.
        eval_data: optional held-out examples; evaluated every eval_interval steps and at the end.

    Returns:
        The summary dict, also written to ``<output_dir>/summary.json``.

    Raises:
        FloatingPointError: a step's loss or gradient norm is NaN/Inf (after a checkpoint of the
            last good state has been written).
        ValueError: bad data, or a resume checkpoint from a different method, model or data order.
    """
    _check_examples(train_data, "train_data")
    if eval_data is not None:
        _check_examples(eval_data, "eval_data")
    return _Loop(model, train_data, config, eval_data).run()


class _Loop:
    """State of one `train` call; every method is one phase of the loop."""

    def __init__(self, model, train_data, config: TrainConfig, eval_data):
        self.model, self.data, self.config, self.eval_data = model, train_data, config, eval_data
        self.device = _pick_device(config)
        model.to(self.device)
        self.out = Path(config.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt.clean_incomplete(self.out)
        _seed_everything(config.seed)
        self.optimizer = make_optimizer(model, config)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.data_fp = ckpt.data_fingerprint(train_data)
        # Adapter checkpoints rely on the frozen base they were trained on; "full" checkpoints
        # hold the whole model, so any base is overwritten on resume. Taken once: it is frozen.
        self.base_fp = ckpt.base_fingerprint(model) if config.method != "full" else None
        # batch_tokens / batch_slots: real tokens and (B, T) slots of the micro-batches processed,
        # for the padding efficiency of the run. batch_tokens counts what "tokens" counts, but the
        # two are restored together, so a checkpoint written before batch_slots existed resumes
        # to 0 / 0 here instead of a ratio of a restored count over a fresh one.
        self.state = {"step": 0, "epoch": 0, "batch_index": 0, "epochs_done": 0.0, "first_loss": None,
                      "last_loss": None, "tokens": 0, "trained_tokens": 0, "train_time": 0.0,
                      "timed_tokens": 0, "timed_time": 0.0, "batch_tokens": 0, "batch_slots": 0,
                      "evals": []}
        self.resumed = self._resume()
        self.saved_at = self.state["step"] if self.resumed else None
        self.last_path, self.memory = self.resumed, None
        self.total = total_steps(train_data, config)
        self.schedule = Schedule.from_ratio(config.learning_rate, self.total, config.warmup_ratio,
                                            config.lr_scheduler)

    def _resume(self) -> Optional[str]:
        if not self.config.resume_from:
            return None
        path = ckpt.resolve_checkpoint(self.config.resume_from, self.out)
        saved = ckpt.read_trainer_state(path)
        ckpt.check_compatible(saved, path, method=self.config.method, model=self.model,
                              config=self.config.to_dict(), fields=DATA_ORDER_FIELDS, data=self.data_fp,
                              base=self.base_fp)
        ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer)
        self.state.update({k: saved[k] for k in self.state if k in saved})
        return path

    def run(self) -> dict:
        from tqdm.auto import tqdm

        metrics = self.out / "metrics.jsonl"
        kept = []  # a crashed run may have logged past the checkpoint we resume from
        if self.resumed and metrics.exists():
            kept = [line for line in metrics.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= self.state["step"]]
        metrics.write_text("".join(line + "\n" for line in kept))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.bar = tqdm(total=self.total, initial=self.state["step"], unit="step", dynamic_ncols=True,
                        disable=not (self.config.progress and sys.stdout.isatty()))
        self.model.train()
        try:
            with _gradient_checkpointing(self.model, self.config.gradient_checkpointing), \
                    _neftune(self.model, self.config.neftune_alpha), open(metrics, "a") as log:
                groups = step_groups(self.data, self.config, self.state["epoch"],
                                     self.state["batch_index"])
                while self.state["step"] < self.total:
                    after, epochs_done, group = next(groups)
                    line = self._step(group)
                    self.state.update(epoch=after[0], batch_index=after[1], epochs_done=epochs_done)
                    self._after_step(line, log)
                if self.eval_data is not None and \
                        (not self.state["evals"] or self.state["evals"][-1]["step"] != self.state["step"]):
                    self._evaluate()
                if self.saved_at != self.state["step"]:
                    self._save()
        finally:
            self.bar.close()
        summary = self._summary()
        if summary["padding_efficiency"] is not None:
            self._say(f"padding efficiency {summary['padding_efficiency']:.1%} (real tokens / "
                      f"slots of the padded micro-batches of all {summary['steps']} steps)")
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _step(self, group: list) -> dict:
        """One optimizer step over `group`'s micro-batches; returns its metrics line."""
        from minift.memory.tracker import MemoryTracker

        rng_before = ckpt.rng_state()  # for a checkpoint of the last good state
        step = self.state["step"] + 1
        lr = self.schedule.lr(step - 1)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        tracker = MemoryTracker(self.model, self.optimizer) if self.memory is None else None
        t0 = time.perf_counter()
        with tracker.track() if tracker else contextlib.nullcontext():
            loss, n_trained = accumulate_gradients(self.model, group, self.device, self.config.bf16)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or math.inf)
            loss, norm = float(loss), float(norm)
            finite = math.isfinite(loss) and math.isfinite(norm)
            if finite:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        if not finite:
            path = self._save(rng=rng_before)  # parameters and optimizer are still at step - 1
            what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
            raise FloatingPointError(f"training {what} is {value} at step {step}; the last good "
                                     f"state (step {step - 1}) is saved in {path}")
        if tracker is not None:
            self.memory = tracker.report().as_dict()
            self._say(tracker.report().table())
        n_tokens = sum(int(b["attention_mask"].sum()) for b in group)
        n_slots = sum(b["attention_mask"].numel() for b in group)
        st = self.state
        st.update(step=step, last_loss=loss, tokens=st["tokens"] + n_tokens,
                  trained_tokens=st["trained_tokens"] + n_trained, train_time=st["train_time"] + seconds,
                  batch_tokens=st["batch_tokens"] + n_tokens, batch_slots=st["batch_slots"] + n_slots)
        if st["first_loss"] is None:
            st["first_loss"] = loss
        if tracker is None:  # the tracked step is slowed by tracking and one-time warm-up
            st.update(timed_tokens=st["timed_tokens"] + n_tokens, timed_time=st["timed_time"] + seconds)
        return {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tokens": n_tokens,
                "trained_tokens": n_trained, "tokens_per_s": n_tokens / seconds,
                "elapsed": st["train_time"]}

    def _after_step(self, line: dict, log) -> None:
        step, config = line["step"], self.config
        line["epoch"] = round(self.state["epochs_done"], 4)
        if self.eval_data is not None and config.eval_interval and step % config.eval_interval == 0:
            line["eval_loss"] = self._evaluate()["eval_loss"]
        log.write(json.dumps(line) + "\n")
        log.flush()
        self.bar.update(1)
        if step % config.log_interval == 0 or step == self.total:
            peak = f"{_peak_memory(self.device) / 2**20:.0f}MiB"
            self.bar.set_postfix({"loss": f"{line['loss']:.4f}", "lr": f"{line['lr']:.2e}",
                                  "tok/s": f"{line['tokens_per_s']:.0f}", "peak": peak}, refresh=False)
            if self.bar.disable:
                self._say(f"step {step}/{self.total} loss {line['loss']:.4f} lr {line['lr']:.2e} "
                          f"tok/s {line['tokens_per_s']:.0f} peak {peak}")
        if config.save_interval and step % config.save_interval == 0:
            self._save()

    def _say(self, text: str) -> None:
        if self.config.progress:
            (print if self.bar.disable else self.bar.write)(text)

    def _evaluate(self) -> dict:
        result = dict(evaluate(self.model, self.eval_data, self.config, self.device),
                      step=self.state["step"])
        self.state["evals"].append(result)
        return result

    def _save(self, rng=None) -> str:
        trainer_state = dict(self.state, config=self.config.to_dict(), data=self.data_fp,
                             base=self.base_fp, total_steps=self.total)
        path = ckpt.save_checkpoint(self.out, self.state["step"], model=self.model,
                                    optimizer=self.optimizer, method=self.config.method,
                                    trainer_state=trainer_state, keep_last=self.config.keep_last, rng=rng)
        self.last_path, self.saved_at = path, self.state["step"]
        return path

    def _summary(self) -> dict:
        from minift.lora import trainable_parameters  # counts NF4 weights by their logical size

        st, config = self.state, self.config
        trainable, total = trainable_parameters(self.model)
        return {
            "method": config.method, "steps": st["step"], "total_steps": self.total,
            "epochs": round(st["epochs_done"], 4), "first_loss": st["first_loss"],
            "last_loss": st["last_loss"], "eval_loss": st["evals"][-1]["eval_loss"] if st["evals"] else None,
            "eval": st["evals"], "tokens": st["tokens"], "trained_tokens": st["trained_tokens"],
            "train_time_s": st["train_time"],
            "tokens_per_s": (st["timed_tokens"] / st["timed_time"] if st["timed_time"] else
                             st["tokens"] / st["train_time"] if st["train_time"] else None),
            "padding_efficiency": (st["batch_tokens"] / st["batch_slots"] if st["batch_slots"]
                                   else None),
            "trainable_params": trainable, "total_params": total,
            "peak_memory_bytes": _peak_memory(self.device),
            "peak_memory_kind": "cuda_max_allocated" if self.device.type == "cuda" else "process_max_rss",
            "memory": self.memory, "device": str(self.device), "optimizer": config.optimizer,
            "checkpoint": self.last_path, "resumed_from": self.resumed, "output_dir": str(self.out),
        }

