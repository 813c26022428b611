"""Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023).

For a pair (x, y_w chosen, y_l rejected), a policy pi and a fixed reference pi_ref, DPO's loss
(paper eq. 7) is

    -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

where log pi(y|x) sums the log-probabilities of the reply's tokens only. The implicit reward of a
reply is beta * (log pi - log pi_ref); "reward accuracy" is the share of pairs whose chosen reward
is above the rejected one. IPO (eq. 17) replaces the logistic loss by the square
(h - 1 / (2 beta))^2 of the same log-ratio difference h, on length-averaged log-probabilities.

The reference costs no second copy with LoRA/QLoRA: it is the same model with its adapters
switched off (`AdapterReference`). Full fine-tuning needs a frozen copy (`ModelReference`,
optionally NF4-quantized) or log-probabilities computed once before training and stored on disk
(`precompute_reference`, read back through the batch's "ref_logps"). The log-probs and the
references live in `minift.objectives.reference` (imported here as well).

Under torchrun the objective is told its rank's `minift.distributed.parallel.Shard`: each rank runs its
share of a step's pairs, the loss is divided by the pairs of all ranks, and the metrics are sums
over all ranks; a frozen copy is sharded (FSDP) or replicated (DDP) like the policy, and the
precomputed log-probs are scored by all ranks together (`DPOObjective.distribute`).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from minift.checks import check_choice, check_number
from minift.data.preference import check_pairs, pair_batches
from minift.distributed.parallel import accumulate_over_ranks
from minift.lora.layer import lora_layers
from minift.names import IGNORE_INDEX
from minift.objectives.reference import (
    MODEL_KEYS,
    REFERENCE_FILE,
    AdapterReference,
    ModelReference,
    SelfReference,
    StoredReference,
    eval_mode,
    model_logps,
    precompute_reference,
    sequence_logps,
)
from minift.placement import default_device
from minift.tracing import host_read, known

LOSS_TYPES = ("sigmoid", "ipo")
__all__ = ["LOSS_TYPES", "MODEL_KEYS", "REFERENCE_FILE", "AdapterReference", "DPOObjective", "ModelReference",
           "SelfReference", "StoredReference", "dpo_loss", "model_logps", "objective_for", "precompute_reference",
           "sequence_logps"]


# ---- the loss ----------------------------------------------------------------------------
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1,
             loss_type="sigmoid", counts=None):
    """Per-pair loss and implicit rewards.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) summed reply log-probs.
        beta: strength of the pull towards the reference (> 0).
        loss_type: "sigmoid" (DPO) or "ipo".
        counts: (chosen_counts, rejected_counts), (B,) each; IPO divides the log-probs by them.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,) float32; rewards are detached.
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()  # (B,) log pi/pi_ref of y_w
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if counts is None:
            raise ValueError("dpo_loss: loss_type='ipo' needs the reply token counts")
        h = chosen_ratio / counts[0] - rejected_ratio / counts[1]
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"dpo_loss: loss_type must be one of {', '.join(LOSS_TYPES)}; "
                         f"got {loss_type!r}")
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


# ---- the objective the loop calls ----------------------------------------------------------
class DPOObjective:
    """What one DPO optimizer step computes; the training loop asks it for batches and losses.

    Args:
        reference: where pi_ref comes from (AdapterReference, ModelReference, StoredReference).
        beta: DPO's beta (> 0).
        loss_type: "sigmoid" or "ipo".
        sft_weight: adds sft_weight * (-log pi(y_w|x) / |y_w|), the chosen reply's per-token NLL,
            to each pair's loss (RPO, Pang et al. 2024): it keeps DPO from lowering the
            likelihood of the chosen replies along with the rejected ones. 0 = plain DPO.
        loss_chunk_size: tokens per lm_head chunk for the policy's and the reference's log-probs
            (``model_logps``); None = full (2B, T, V) logits. The loop passes
            ``TrainConfig.loss_chunk_size``.
    """

    name = "dpo"

    def __init__(self, reference, beta=0.1, loss_type="sigmoid", sft_weight=0.0, loss_chunk_size=None):
        self.reference = reference
        self.loss_chunk_size = loss_chunk_size
        if hasattr(reference, "chunk"):
            reference.chunk = loss_chunk_size
        self.beta = check_number("dpo_beta", beta, "> 0", lambda v: v > 0)
        self.loss_type = check_choice("dpo_loss_type", loss_type, LOSS_TYPES)
        self.sft_weight = check_number("dpo_sft_weight", sft_weight, ">= 0", lambda v: v >= 0)
        # (pairs, file, config) whose reference log-probs `distribute` scores (objective_for
        # leaves them there under torchrun: the ranks score them once the model is sharded)
        self.pending = []

    @staticmethod
    def check(pairs, name):
        check_pairs(pairs, name)

    def batches(self, pairs, batch_size, pad_id, seed=0, shuffle=True):
        return pair_batches(pairs, batch_size, pad_id=pad_id, seed=seed, shuffle=shuffle)

    def pair_terms(self, model, batch, device, bf16=False):
        """(losses, chosen rewards, rejected rewards, policy logps) of one batch, each (B,)/(2B,).

        Blank pairs (``pair_index`` -1, a rank's padding under torchrun) are run through both
        models, then left out of every returned term: B counts the real pairs only.
        """
        ref = self.reference.logps(batch, device, bf16)  # reference first: no graph is held
        logps, counts = model_logps(model, batch, device, bf16, self.loss_chunk_size)  # (2B,) with grad
        b = logps.shape[0] // 2
        halves = [logps[:b], logps[b:], ref[:b], ref[b:], counts[:b], counts[b:]]
        real = batch.get("pair_index")  # the host batch's: read without a host-device sync
        if real is not None and known(lambda: (real < 0).any(), False):  # fake: no blanks
            with host_read():  # the real pairs' positions, found on the host
                keep = (real >= 0).nonzero().squeeze(1)
            keep = keep.to(logps.device, non_blocking=True)  # an index: no mask read on the device
            halves = [t[keep] for t in halves]
            logps = torch.cat(halves[:2])
        chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected = halves
        losses, cr, rr = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.beta,
                                  self.loss_type, counts=(n_chosen, n_rejected))
        if self.sft_weight:
            losses = losses - self.sft_weight * chosen / n_chosen.clamp(min=1)
        return losses, cr, rr, logps.detach()

    def step(self, model, micro_batches, device, bf16=False, shard=None):
        """Forward/backward over one step's micro-batches; the loss is the mean over all pairs
        of the step, so splitting a step into micro-batches does not change the gradient.

        Args:
            shard: under torchrun, this rank's `minift.distributed.parallel.Shard` (every rank passes the
                same ``micro_batches``): the rank runs its share of the pairs, each loss is
                divided by the pairs of all ranks and back-propagated times the world size
                (FSDP / DDP average gradients), and the returned numbers are global.

        Returns:
            (loss, n_scored, metrics): the step's mean loss (0-dim tensor), the reply tokens
            scored, and the pairs with their reward / log-prob means (0-d float64 tensors on
            the device: the loop reads them with the loss, in the step's one host-device sync).
        """
        device = torch.device(device)
        if shard is not None:
            return self._sharded_step(model, micro_batches, device, bf16, shard)
        n_pairs = sum(len(b["pair_index"]) for b in micro_batches)
        n_scored = sum(scored_tokens(b) for b in micro_batches)
        sums = torch.zeros(N_METRICS, dtype=torch.float64, device=device)
        total = torch.zeros((), device=device)
        for batch in micro_batches:
            losses, cr, rr, logps = self.pair_terms(model, batch, device, bf16)
            loss = losses.sum() / n_pairs
            loss.backward()
            total += loss.detach()
            sums += _metric_sums(cr, rr, logps)
        return total, n_scored, dict(pairs=n_pairs, **_metric_means(sums, n_pairs))

    def _sharded_step(self, model, micro_batches, device, bf16, shard):
        """`step` under torchrun: the pairs' loss through minift.distributed.parallel.accumulate_over_ranks
        (normalised by the global pair count), the metric sums added over ranks on the device.
        The counts come from the host batches of the whole step, which every rank holds."""
        local = shard.step(micro_batches)
        sums = torch.zeros(N_METRICS, dtype=torch.float64, device=device)

        def loss_sum(model, batch, device):
            nonlocal sums
            losses, cr, rr, logps = self.pair_terms(model, batch, device, bf16)
            sums += _metric_sums(cr, rr, logps)
            return losses.sum()

        n_total = sum(real_pairs(b) for b in micro_batches)
        loss, n_pairs = accumulate_over_ranks(model, local, device, loss_sum, real_pairs, n_total)
        n_scored = sum(scored_tokens(b) for b in micro_batches)
        sums = shard.sum(sums)
        return loss, n_scored, dict(pairs=n_pairs, **_metric_means(sums, n_pairs))

    @torch.no_grad()
    def evaluate(self, model, pairs, config, device, shard=None):
        """Mean loss, reward accuracy and margins over `pairs`, in eval mode, batched as the
        config (a TrainConfig) batches training. With a ``shard`` (torchrun; every rank calls
        it) each rank scores its share of the batches and every rank returns the global means."""
        sums, loss = torch.zeros(N_METRICS, dtype=torch.float64), 0.0
        device = torch.device(device)
        batches = self.batches(pairs, config.micro_batch_size, config.pad_id, shuffle=False)
        with eval_mode(model):
            for batch in batches if shard is None else shard.eval(batches):
                losses, cr, rr, logps = self.pair_terms(model, batch, device, config.bf16)
                loss += float(losses.sum())
                sums += _metric_sums(cr, rr, logps).cpu()
        if shard is not None:
            total = shard.sum(torch.cat([torch.tensor([loss], dtype=torch.float64), sums]))
            loss, sums = float(total[0]), total[1:]
        out = {k: float(known(v, 0.0)) for k, v in _metric_means(sums, len(pairs)).items()}
        return {"eval_loss": loss / len(pairs), **{f"eval_{k}": v for k, v in out.items()}}

    @torch.no_grad()
    def finite_on(self, model, batch, device, config) -> bool:
        """Whether the pair loss of one micro-batch is finite (naming a batch that gave NaN)."""
        losses = self.pair_terms(model, batch, torch.device(device), config.bf16)[0]
        return bool(torch.isfinite(losses).all())

    def frozen_models(self) -> tuple:
        """The reference's own model when it is a separate copy (full fine-tuning, "copy_nf4"),
        which the memory tracker counts as frozen weights; the adapters-off reference is the
        policy itself and a stored one holds no model."""
        return (self.reference.model,) if isinstance(self.reference, ModelReference) else ()

    def distribute(self, shard, place):
        """Under torchrun, once the policy is sharded (every rank calls it): a frozen reference
        copy is laid out like the policy by ``place`` (model -> model; FSDP-sharded, or on the
        rank's device under DDP), then the reference log-probs ``objective_for`` left pending
        are scored by all ranks together and the reference becomes the stored log-probs."""
        if isinstance(self.reference, ModelReference):
            self.reference.place(place)
        if not self.pending:
            return
        for pairs, path, config in self.pending:
            precompute_reference(self.reference, pairs, path, batch_size=config.micro_batch_size,
                                 pad_id=config.pad_id, device=shard.device, bf16=config.bf16, shard=shard)
        self.pending = []
        self.reference = StoredReference()


def real_pairs(batch) -> int:
    """Pairs of a pair batch that count (a blank pair's ``pair_index`` is -1)."""
    index = batch["pair_index"]
    return int(known(lambda: (index >= 0).sum(), index.numel()))  # fake: every pair real


def scored_tokens(batch) -> int:
    """Reply tokens a pair batch scores (label positions after the shift)."""
    labels = batch["labels"]  # the host batch's: counted without a host-device sync
    every = labels.shape[0] * (labels.shape[1] - 1)  # fake labels: all scored
    return int(known(lambda: (labels[:, 1:] != IGNORE_INDEX).sum(), every))


def _metric_sums(chosen_rewards, rejected_rewards, logps):
    b = chosen_rewards.shape[0]
    return torch.stack([chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards > rejected_rewards).sum(),
                        (chosen_rewards - rejected_rewards).sum(),
                        logps[:b].sum(), logps[b:].sum(),
                        (logps[:b] > logps[b:]).sum()]).double()  # on the device: no sync


# reward_accuracy: chosen reward > rejected reward (0 while the policy is the reference: ties);
# logp_accuracy: the policy gives the chosen reply the higher log-probability (meaningful at once)
METRICS = ("chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin", "chosen_logp",
           "rejected_logp", "logp_accuracy")
N_METRICS = len(METRICS)


def _metric_means(sums, n) -> dict:
    """The metrics' means over ``n`` pairs as 0-d float64 tensors where ``sums`` lives (the
    device, in a step: read by the loop with the loss). The divisor is a tensor of ``sums``'s
    device, so each mean is the correctly rounded quotient ``float(sum) / n`` would give (CUDA
    multiplies by the reciprocal of a Python number instead)."""
    means = sums / torch.full((), max(n, 1), dtype=torch.float64, device=sums.device)
    return dict(zip(METRICS, means.unbind()))


def objective_for(model, config, train_data, eval_data=None, *, distributed=False):
    """The DPOObjective a TrainConfig asks for, built before any checkpoint is loaded (so a full
    fine-tune's frozen copy and precomputed log-probs come from the model as given).

    LoRA/QLoRA: the adapters switched off, unless dpo_reference="copy_nf4". Full: a frozen copy
    (NF4 with "copy_nf4"). With precompute_reference, that reference scores train and eval
    pairs once into ``<output_dir>/reference_logps*.safetensors`` and is then dropped; with
    ``distributed`` (torchrun) that waits for `DPOObjective.distribute`, once the model is
    sharded and the copy placed, and all ranks score the pairs together.
    """
    if config.dpo_reference == "copy_nf4":
        reference = ModelReference.copy_of(model, nf4=True)
    elif lora_layers(model):
        reference = AdapterReference(model)
        if any(known(m.lora_B.weight.any(), False) for _, m in lora_layers(model)):  # fake: fresh
            # DPO's reference is the policy it starts from; switched-off trained adapters give the
            # base instead. Merge a starting (SFT) adapter first and wrap a fresh one on top.
            warnings.warn("DPO with adapters that are not zero: the reference (adapters off) is "
                          "the base model, not the starting policy; merge_lora the starting "
                          "adapter and lora_wrap a fresh one to use it as the reference",
                          stacklevel=3)
    elif config.precompute_reference:
        reference = SelfReference(model)  # scored before step 1: the model is still the start
    else:
        reference = ModelReference.copy_of(model)
    objective = DPOObjective(reference, beta=config.dpo_beta, loss_type=config.dpo_loss,
                             sft_weight=config.dpo_sft_weight, loss_chunk_size=config.loss_chunk_size)
    if config.precompute_reference:
        out = Path(config.output_dir)
        objective.pending = [(data, out / name, config) for data, name in
                             ((train_data, REFERENCE_FILE), (eval_data, "eval_" + REFERENCE_FILE))
                             if data is not None]
        if not distributed:
            out.mkdir(parents=True, exist_ok=True)
            device = default_device(config.device)
            for data, path, _ in objective.pending:
                precompute_reference(reference, data, path, batch_size=config.micro_batch_size,
                                     pad_id=config.pad_id, device=device, bf16=config.bf16)
            objective.pending = []
            objective.reference = StoredReference()
    return objective
