"""`TrainConfig`: everything the training loop needs to know, in one flat dataclass."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from minift.checks import check_choice, check_flag, check_int, check_number
from minift.names import METHODS, OPTIMIZERS, PARALLEL
from minift.optim.in_backward import check_step_in_backward
from minift.optim.paging import DEFAULT_DEVICE_BUDGET
from minift.training.schedule import SCHEDULES

BATCHING = ("bucket", "pack")
OBJECTIVES = ("sft", "dpo", "grpo")
# Fields that fix which micro-batches make up step N; a resumed run must keep them.
DATA_ORDER_FIELDS = ("micro_batch_size", "grad_accum", "batching", "seed", "max_length", "pad_id",
                     "group_by_length")
# Data-order fields added after checkpoints were first written: the value the runs of older
# checkpoints (which do not record the field) had.
DATA_ORDER_BEFORE = {"group_by_length": True}


@dataclass
class TrainConfig:
    """Everything the loop needs to know. Flat, with defaults; checked on construction.

    | field | default | meaning |
    |---|---|---|
    | method | "lora" | "full", "lora" or "qlora": what the checkpoints hold; recorded in summaries |
    | learning_rate | 2e-4 | peak learning rate, in (0, 3.4e37): above, AdamW's float32 update overflows |
    | warmup_ratio | 0.03 | fraction of the steps with linear warm-up, in [0, 1) |
    | lr_scheduler | "cosine" | decay after warm-up: "cosine", "linear" or "constant" |
    | epochs | 1 | passes over train_data (ignored when max_steps is set) |
    | max_steps | None | optimizer steps to run; None = as many as `epochs` take |
    | micro_batch_size | 4 | examples per forward/backward |
    | grad_accum | 1 | micro-batches per optimizer step |
    | max_grad_norm | 1.0 | clip the global gradient norm to this; None = no clipping |
    | bf16 | True | run forward/backward under bf16 autocast (CPU and CUDA) |
    | gradient_checkpointing | False | recompute each decoder layer in backward |
    | compile | False | run the decoder layers through torch.compile while training |
    | optimizer | "adamw" | "adamw" (torch), "adamw8bit" or "paged_adamw8bit" (minift.optim) |
    | weight_decay | 0.0 | decoupled weight decay on matrices (not on biases or norm weights) |
    | neftune_alpha | None | NEFTune noise on the token embeddings while training; None = off |
    | batching | "bucket" | "bucket" (similar lengths together) or "pack" (several samples per row) |
    | max_length | None | row length for "pack" batching (passed to minift.data.sft.batch_examples) |
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
    | parallel | None | "fsdp" or "ddp" under torchrun; None = "fsdp" when the world size is > 1 |
    | fsdp_cpu_offload | False | FSDP: keep sharded parameters, gradients and optimizer states in host memory |
    | objective | "sft" | "sft" (token cross-entropy), "dpo" (train_data holds preference pairs) or "grpo" (prompts, online RL) |
    | dpo_beta | 0.1 | DPO's beta: how strongly the policy is held near the reference |
    | dpo_loss | "sigmoid" | "sigmoid" (DPO) or "ipo" |
    | dpo_sft_weight | 0.0 | weight of the chosen replies' per-token NLL added to the loss (RPO) |
    | dpo_reference | "auto" | "auto" (LoRA/QLoRA: adapters off; full: a frozen copy) or "copy_nf4" |
    | precompute_reference | False | score the pairs with the reference once, before step 1 (on disk) |
    | grpo_group_size | 4 | GRPO: completions sampled per prompt (>= 2), normalised within their group |
    | grpo_max_new_tokens | 32 | GRPO: tokens per completion at most (eos ends one earlier) |
    | grpo_kl_beta | 0.04 | GRPO: weight of the k3 KL to the reference; 0 = no reference forward |
    | grpo_clip_eps | 0.2 | GRPO: the probability ratio is clipped to [1 - eps, 1 + eps] |
    | grpo_temperature | 1.0 | GRPO: sampling temperature of the rollouts (> 0) |
    | loss_chunk_size | 1024 | tokens per chunk of the lm_head + loss (no (B, T, V) logits); None = full logits |
    | activation_offload | False | checkpointed layer inputs wait in host memory (needs gradient_checkpointing) |
    | optimizer_in_backward | False | step each parameter in backward and free its gradient (needs max_grad_norm=None, grad_accum=1) |
    | mlp_tile_size | None | tokens per MLP tile (each checkpointed) for long sequences; None = whole sequence |
    | paged_device_budget | 2**30 | paged_adamw8bit: device bytes of state pages kept on the device; None = all kept |
    | dist_timeout | 1800.0 | torchrun: seconds a collective waits for the other ranks before the job fails |
    | skip_steps | () | optimizer steps whose micro-batches are passed over untrained (a batch that gives NaN) |
    | group_by_length | True | "bucket": rows of similar length share a micro-batch; False = random micro-batches |
    | s2_attention | False | shifted sparse attention (S²-Attn, LongLoRA) in training forwards; evaluation attends fully |
    | s2_group_size | None | S²-Attn's group in tokens (>= 2); None = a quarter of each micro-batch's length |
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
    compile: bool = False
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
    parallel: Optional[str] = None
    fsdp_cpu_offload: bool = False
    objective: str = "sft"
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"
    dpo_sft_weight: float = 0.0
    dpo_reference: str = "auto"
    precompute_reference: bool = False
    grpo_group_size: int = 4
    grpo_max_new_tokens: int = 32
    grpo_kl_beta: float = 0.04
    grpo_clip_eps: float = 0.2
    grpo_temperature: float = 1.0
    loss_chunk_size: Optional[int] = 1024
    activation_offload: bool = False
    optimizer_in_backward: bool = False
    paged_device_budget: Optional[int] = DEFAULT_DEVICE_BUDGET  # 2**30
    mlp_tile_size: Optional[int] = None
    dist_timeout: float = 1800.0
    skip_steps: tuple = ()
    group_by_length: bool = True
    s2_attention: bool = False
    s2_group_size: Optional[int] = None

    def __post_init__(self):
        for name, allowed in (("method", METHODS), ("optimizer", OPTIMIZERS),
                              ("lr_scheduler", SCHEDULES), ("batching", BATCHING),
                              ("objective", OBJECTIVES), ("dpo_loss", ("sigmoid", "ipo")),
                              ("dpo_reference", ("auto", "copy_nf4"))):
            check_choice(f"TrainConfig.{name}", getattr(self, name), allowed)
        for name, rule, ok, optional in (
                # AdamW's update divides the rate by 1 - beta1**t >= 0.1 in float32 (max 3.4e38)
                ("learning_rate", "in (0, 3.4e37)", lambda v: 0 < v < 3.4e37, False),
                ("warmup_ratio", "in [0, 1)", lambda v: 0 <= v < 1, False),
                ("weight_decay", ">= 0", lambda v: v >= 0, False),
                ("max_grad_norm", "> 0", lambda v: v > 0, True),
                ("neftune_alpha", "> 0", lambda v: v > 0, True),
                ("dpo_beta", "> 0", lambda v: v > 0, False),
                ("dpo_sft_weight", ">= 0", lambda v: v >= 0, False),
                ("dist_timeout", "> 0", lambda v: v > 0, False),
                ("grpo_kl_beta", ">= 0", lambda v: v >= 0, False),
                ("grpo_clip_eps", "in (0, 1)", lambda v: 0 < v < 1, False),
                ("grpo_temperature", "> 0", lambda v: v > 0, False)):
            check_number(f"TrainConfig.{name}", getattr(self, name), rule, ok, optional=optional)
        check_int("TrainConfig.grpo_group_size", self.grpo_group_size, minimum=2)
        for name in ("epochs", "micro_batch_size", "grad_accum", "log_interval", "grpo_max_new_tokens"):
            check_int(f"TrainConfig.{name}", getattr(self, name))
        for name in ("max_steps", "eval_interval", "save_interval", "keep_last", "max_length"):
            check_int(f"TrainConfig.{name}", getattr(self, name), optional=True)
        check_flag("TrainConfig.compile", self.compile)
        # numpy's generator takes seeds in [0, 2**32); checked here rather than where the run
        # seeds its generators, so that a bad seed fails before any work.
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32:
            raise ValueError(f"TrainConfig.seed must be an integer in [0, 2**32), got {self.seed!r}")
        check_flag("TrainConfig.precompute_reference", self.precompute_reference)
        if self.objective == "dpo" and self.batching != "bucket":
            raise ValueError("TrainConfig.batching must be 'bucket' with objective='dpo' (a pair's "
                             "two sequences are padded side by side, never packed)")
        if self.objective == "grpo" and self.batching != "bucket":
            raise ValueError("TrainConfig.batching must be 'bucket' with objective='grpo' (prompts are "
                             "left-padded for generation, never packed)")
        check_int("TrainConfig.loss_chunk_size", self.loss_chunk_size, optional=True)
        check_int("TrainConfig.mlp_tile_size", self.mlp_tile_size, optional=True)
        check_int("TrainConfig.paged_device_budget", self.paged_device_budget, minimum=0,
                  optional=True)
        for name in ("activation_offload", "optimizer_in_backward"):
            check_flag(f"TrainConfig.{name}", getattr(self, name))
        if self.activation_offload and not self.gradient_checkpointing:
            raise ValueError("TrainConfig.activation_offload=True moves the inputs that gradient "
                             "checkpointing keeps; set gradient_checkpointing=True as well")
        if self.optimizer_in_backward:
            check_step_in_backward(max_grad_norm=self.max_grad_norm, grad_accum=self.grad_accum)
        if self.parallel is not None:
            check_choice("TrainConfig.parallel", self.parallel, PARALLEL)
        if isinstance(self.skip_steps, (str, bytes)) or not hasattr(self.skip_steps, "__iter__"):
            raise TypeError(f"TrainConfig.skip_steps must be a list of step numbers, got {self.skip_steps!r}")
        self.skip_steps = tuple(sorted({check_int("TrainConfig.skip_steps[]", s) for s in self.skip_steps}))
        check_flag("TrainConfig.fsdp_cpu_offload", self.fsdp_cpu_offload)
        if self.fsdp_cpu_offload and self.parallel == "ddp":
            raise ValueError("TrainConfig.fsdp_cpu_offload=True moves FSDP's shards to host memory, "
                             "and parallel='ddp' has none; use parallel='fsdp'")
        if self.batching == "pack" and self.max_length is None:
            raise ValueError("TrainConfig.max_length must be set when batching='pack' (the row length)")
        self._check_long_context()

    def _check_long_context(self):
        for name in ("group_by_length", "s2_attention"):
            check_flag(f"TrainConfig.{name}", getattr(self, name))
        if not self.group_by_length and self.batching == "pack":
            raise ValueError("TrainConfig.group_by_length=False (random micro-batches) applies to "
                             "batching='bucket'; packing fills rows by length")
        check_int("TrainConfig.s2_group_size", self.s2_group_size, minimum=2, optional=True)
        if self.s2_group_size is not None and not self.s2_attention:
            raise ValueError("TrainConfig.s2_group_size is set, but s2_attention=False; set "
                             "s2_attention=True as well")
        if self.s2_attention and self.batching == "pack":
            raise ValueError("TrainConfig.s2_attention=True groups the positions of a row, and "
                             "batching='pack' puts several samples in a row; use batching='bucket'")
        if self.s2_attention and self.objective != "sft":
            raise ValueError(f"TrainConfig.s2_attention=True is for SFT: with objective="
                             f"'{self.objective}' a frozen reference would score with full attention")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
