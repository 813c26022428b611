"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath section 4.1): online RL
without a value model.

For each prompt q the policy samples a group of G completions o_1..o_G, a reward function scores
them, and each completion's advantage is its reward normalised within its group:

    A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + eps)          (std with Bessel's correction)

Every completion token t of o_i then gets the clipped surrogate of PPO and a KL penalty towards
a fixed reference pi_ref (the k3 estimator, always >= 0, unbiased for KL(pi || pi_ref)):

    ratio   = exp(log pi(o_t) - log pi_old(o_t))
    surr    = min(ratio * A_i, clip(ratio, 1 - clip_eps, 1 + clip_eps) * A_i)
    kl      = exp(log pi_ref(o_t) - log pi(o_t)) - (log pi_ref(o_t) - log pi(o_t)) - 1
    loss_t  = -(surr - beta * kl)

Normalisation, as in the paper's eq. 3: the mean over a completion's own tokens, then the mean
over the completions of the step. (Alternatives: the sum over all completion tokens of the step
divided by their count, as in DAPO, which weights long completions more; or a fixed divisor
G * max_new_tokens, as in Dr. GRPO, which removes the length bias of the per-sequence mean.)

pi_old is the policy that sampled the completions. This objective takes one optimizer step per
batch of rollouts, so pi_old is the policy itself: its log-probs are the policy's, detached, the
ratio is 1 in value and its gradient is that of the policy's log-prob (nothing is ever clipped).

The reference costs no second model with LoRA/QLoRA (the adapters switched off) and is a frozen
copy for full fine-tuning, as for DPO (``minift.objectives.reference``). Per-token log-probs run
the lm_head a chunk of tokens at a time (``minift.objectives.loss.chunked_token_logps``).

Under torchrun the step's prompt micro-batches are dealt out to the ranks (``split_prompts``):
whole micro-batches when their number divides by the world size (the rollouts are then those of
one process), else each micro-batch's prompts, with a sample seed per rank (``rank_seed``). A
group of G completions always stays on one rank, so its advantages need no other rank. The loss
is divided by the completions of all ranks and the metrics are sums over ranks; decoding stops
when every rank's rows have ended, so that FSDP's gathers stay in step.
"""
from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

import torch

from minift.checks import check_int, check_number
from minift.distributed.parallel import accumulate_over_ranks, reshard, shard_batches, shard_group, unwrap
from minift.lora.layer import disable_adapters, lora_layers
from minift.models.generation import generate
from minift.names import IGNORE_INDEX
from minift.objectives.loss import chunked_token_logps, shift_labels, supports_chunked_loss
from minift.objectives.reference import AdapterReference, ModelReference, eval_mode
from minift.tracing import host_read, known

__all__ = ["GRPOObjective", "blank_prompts", "completions", "eval_share", "group_advantages", "grpo_loss",
           "prompt_batches", "prompt_rows", "rank_seed", "ranks_ended", "select_prompts", "split_prompts",
           "token_logps"]

METRICS = ("reward_mean", "reward_std", "kl", "clip_fraction", "completion_length")
# what a step adds up over its completions (and, under torchrun, over ranks) to give METRICS
SUMS = ("reward", "reward_squared", "kl", "clipped", "length")


# ---- the loss ----------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for (P * G,) rewards laid out group after group.

    A group whose completions all scored the same gets advantage 0 (nothing to learn from it).
    """
    groups = rewards.double().view(-1, group_size)  # (P, G)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(groups[:, :1])
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).view(-1).float()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: Optional[torch.Tensor],
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04):
    """Per-completion GRPO losses (token mean within each completion) and their statistics.

    Args:
        logps: (N, T) log pi of each completion token, with gradient.
        old_logps: (N, T) log pi_old of the same tokens (detached).
        ref_logps: (N, T) log pi_ref, or None when beta is 0.
        advantages: (N,) one per completion.
        mask: (N, T) 1 on completion tokens, 0 elsewhere (prompt, after eos, padding).
        clip_eps: the ratio is clipped to [1 - clip_eps, 1 + clip_eps].
        beta: weight of the k3 KL estimate.

    Returns:
        (losses (N,), kl (N,) token-mean k3 per completion (detached), clipped (N,) share of
        tokens whose clipped term is the smaller one (detached)).
    """
    mask = mask.float()
    count = mask.sum(-1).clamp(min=1)
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    per_token = -torch.minimum(ratio * adv, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    was_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    losses = (per_token * mask).sum(-1) / count
    return losses, ((kl * mask).sum(-1) / count).detach(), ((was_clipped * mask).sum(-1) / count).detach()


def token_logps(model, input_ids, attention_mask, labels, bf16: bool = False,
                chunk: Optional[int] = None) -> torch.Tensor:
    """(N, T) log p(labels[t + 1]) at each position t of left-padded rows; 0 where unscored.

    Positions count real tokens only (as in ``minift.models.generation``), so a completion's
    log-probs are those of the tokens the rollout sampled.
    """
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        if chunk is not None and supports_chunked_loss(model):
            hidden = model(input_ids, attention_mask=attention_mask, position_ids=positions,
                           return_hidden=True)
            return chunked_token_logps(hidden, unwrap(model).lm_head, labels, chunk)
        logits = model(input_ids, attention_mask=attention_mask, position_ids=positions)
    targets = shift_labels(labels)
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(targets.shape)


# ---- prompts -----------------------------------------------------------------------------
def prompt_rows(rows: Sequence[dict], tokenizer, name: str) -> list[dict]:
    """The loop's view of prompt rows: {"input_ids": prompt ids, "labels": all IGNORE_INDEX
    (no prompt token is trained), "row": the row as given}.

    A row holds "prompt" (text, tokenized with ``tokenizer``: its chat template when it has one)
    or "input_ids" (ids already); "answer" and any other keys reach the reward function.
    """
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError(f"{name} must be a non-empty list of prompt rows (dicts with 'prompt')")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not ("prompt" in row or "input_ids" in row):
            raise ValueError(f"{name}[{i}] must be a dict with 'prompt' (text) or 'input_ids'")
        ids = row.get("input_ids")
        if ids is None:
            if tokenizer is None:
                raise ValueError(f"{name}[{i}] has 'prompt' text: pass tokenizer= to tokenize it")
            ids = _encode(tokenizer, row["prompt"])
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"{name}[{i}] has an empty prompt")
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "row": row})
    return out


def _encode(tokenizer, text) -> list[int]:
    if not isinstance(text, str):
        raise ValueError(f"a prompt must be text, got {type(text).__name__}")
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                  add_generation_prompt=True, tokenize=True))
    return list(tokenizer.encode(text))


def prompt_batches(rows: list, batch_size: int, pad_id: int = 0, seed: int = 0, shuffle: bool = True):
    """Micro-batches of ``batch_size`` prompts, left-padded, in an order fixed by ``seed``.

    Each batch holds input_ids / attention_mask (P, T), the rows (``rows``'s "row"), their
    indices and ``sample_seed``: the seed of the batch's rollouts, so that a resumed run samples
    the same completions without saving any generator state.
    """
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    batches = []
    for k, start in enumerate(range(0, len(order), batch_size)):
        index = order[start:start + batch_size]
        width = max(len(rows[i]["input_ids"]) for i in index)
        ids = torch.full((len(index), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for r, i in enumerate(index):
            p = rows[i]["input_ids"]
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        batches.append({"input_ids": ids, "attention_mask": mask, "row_index": index,
                        "rows": [rows[i]["row"] for i in index], "sample_seed": seed * 1_000_003 + k})
    return batches


# ---- prompts across ranks ------------------------------------------------------------------
def rank_seed(seed: int, rank: int) -> int:
    """The sample seed of rank ``rank``'s share of a prompt micro-batch whose prompts were split
    between ranks: a function of the batch's seed and the rank alone, so a resumed run samples
    the same completions."""
    return (int(seed) * 1_000_003 + 1 + rank) % 2**63


def select_prompts(batch: dict, index: Sequence[int], seed: int) -> dict:
    """Prompts ``index`` of a prompt micro-batch as a batch of their own (left padding trimmed
    to the longest of them), its rollouts sampled with ``seed``."""
    mask = batch["attention_mask"][list(index)]
    width = int(mask.sum(-1).max())
    return {"input_ids": batch["input_ids"][list(index), -width:], "attention_mask": mask[:, -width:],
            "row_index": [batch["row_index"][i] for i in index], "rows": [batch["rows"][i] for i in index],
            "sample_seed": seed}


def blank_prompts(batch: dict, seed: int) -> dict:
    """The first prompt of ``batch``, marked blank: its completions are sampled, scored and
    back-propagated like any (FSDP's collectives need every rank to run as many forwards and
    backwards as the others) but carry no weight: no loss, no metric, no completion counted."""
    return dict(select_prompts(batch, [0], seed), blank=True)


def completions(batch: dict, group_size: int) -> int:
    """Completions of a prompt micro-batch that count (none for a blank one)."""
    return 0 if batch.get("blank") else len(batch["rows"]) * group_size


def split_prompts(group: list, rank: int, world: int) -> list:
    """This rank's part of one step's prompt micro-batches (every rank passes the same group).

    When their number divides by ``world``, rank r takes micro-batches r, r + world, ... whole,
    with their own seeds: the ranks sample exactly the completions of one process. Otherwise each
    micro-batch's prompts are dealt out (rank r takes prompts r, r + world, ...), sampled with
    ``rank_seed`` (another sample than one process's, as deterministic), and a rank left without
    a prompt runs ``blank_prompts``. Either way every rank runs as many micro-batches as the
    others and a prompt's G completions stay on one rank.
    """
    return shard_group(group, rank, world, size=lambda batch: len(batch["rows"]),
                       take=lambda batch, rows: select_prompts(batch, rows, rank_seed(batch["sample_seed"], rank)),
                       blank=lambda batch: blank_prompts(batch, rank_seed(batch["sample_seed"], rank)))


def eval_share(batches: list, rank: int, world: int) -> list:
    """This rank's part of an evaluation (``shard_batches``), its blank batches GRPO's."""
    return shard_batches(batches, rank, world, blank=lambda batch: blank_prompts(batch, batch["sample_seed"]))


def ranks_ended(shard) -> Callable[[torch.Tensor], bool]:
    """``generate``'s stop decision taken by all ranks: True once no rank has a row left running
    (one all-reduce per new token, where one process reads its own flag anyway)."""
    return lambda ended: float(shard.sum((~ended).float())) == 0


# ---- the objective the loop calls ----------------------------------------------------------
class GRPOObjective:
    """What one GRPO optimizer step computes: rollouts, rewards, advantages, the loss.

    Args:
        reference: pi_ref (``AdapterReference`` or ``ModelReference``); None when ``kl_beta`` is 0.
        reward_fn: reward_fn(prompts, completions, rows) -> one float per completion; prompts and
            completions are text when a ``tokenizer`` is given (else token id lists), rows the
            prompt rows as given, each repeated G times.
        tokenizer: decodes completions (and prompts) for ``reward_fn``; None passes ids.
        group_size: G, completions per prompt (>= 2: a group of one has no baseline).
        max_new_tokens: tokens per completion at most.
        kl_beta, clip_eps, temperature, top_p: the loss's and the sampling's settings.
        eos_token_id: ends a completion (its eos token is trained, what follows is masked);
            default the tokenizer's, else the model config's.
        pad_id, loss_chunk_size: as TrainConfig.
    """

    name = "grpo"

    def __init__(self, reference, reward_fn: Callable, tokenizer=None, group_size: int = 4,
                 max_new_tokens: int = 32, kl_beta: float = 0.04, clip_eps: float = 0.2,
                 temperature: float = 1.0, top_p: float = 1.0, eos_token_id=None, pad_id: int = 0,
                 loss_chunk_size: Optional[int] = None):
        if not callable(reward_fn):
            raise ValueError("objective='grpo' needs reward_fn=(prompts, completions, rows) -> list[float]")
        self.reference, self.reward_fn, self.tokenizer = reference, reward_fn, tokenizer
        self.group_size = check_int("grpo_group_size", group_size, minimum=2)
        self.max_new_tokens = check_int("grpo_max_new_tokens", max_new_tokens)
        self.kl_beta = check_number("grpo_kl_beta", kl_beta, ">= 0", lambda v: v >= 0)
        self.clip_eps = check_number("grpo_clip_eps", clip_eps, "in (0, 1)", lambda v: 0 < v < 1)
        self.temperature = check_number("grpo_temperature", temperature, "> 0", lambda v: v > 0)
        self.top_p = top_p
        self.eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.pad_id, self.loss_chunk_size = pad_id, loss_chunk_size

    @staticmethod
    def check(rows, name):
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "input_ids" not in row or "row" not in row:
                raise ValueError(f"{name}[{i}]: not a prepared prompt row (minift.objectives.grpo.prompt_rows)")

    def batches(self, rows, batch_size, pad_id, seed=0, shuffle=True):
        return prompt_batches(rows, batch_size, pad_id, seed, shuffle)

    # ---- rollouts ----
    def rollout(self, model, batch, device, bf16=False, greedy=False, stop=None) -> dict:
        """G completions per prompt of ``batch`` (one with ``greedy``), sampled by ``model`` with
        the batch's seed, and their rewards (0 for a blank batch: ``reward_fn`` is not asked).
        ``stop`` is ``generate``'s (``ranks_ended`` under torchrun); a DDP model generates with
        its module (no gradient to synchronise).

        Returns input_ids / attention_mask / labels (N, T) of prompt + completion (labels: the
        completion tokens up to and including eos, IGNORE_INDEX elsewhere), rewards (N,) and the
        completions' token counts (N,); N = P * G.
        """
        g = 1 if greedy else self.group_size
        prompt = batch["input_ids"].repeat_interleave(g, 0).to(device)
        pmask = batch["attention_mask"].repeat_interleave(g, 0).to(device)
        gen = torch.Generator(device=device).manual_seed(int(batch["sample_seed"]))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = generate(unwrap(model), prompt, self.max_new_tokens,
                           temperature=0.0 if greedy else self.temperature, top_p=self.top_p,
                           eos_token_id=self.eos, pad_token_id=self.pad_id, attention_mask=pmask,
                           generator=gen, stop=stop)
        width = prompt.shape[1]
        completion = out[:, width:]  # (N, n)
        eos = _eos_tensor(model, self.eos, device)
        is_eos = torch.isin(completion, eos).long()
        # a token is kept when no eos came before it (the eos itself is kept)
        keep = (is_eos.cumsum(-1) - is_eos) == 0
        labels = torch.full_like(out, IGNORE_INDEX)
        labels[:, width:] = torch.where(keep, completion, torch.full_like(completion, IGNORE_INDEX))
        mask = torch.cat([pmask, keep.long()], dim=1)
        rewards = (torch.zeros(len(out), device=device) if batch.get("blank") else
                   self.rewards(batch["rows"], g, prompt, pmask, completion, keep, device))
        return {"input_ids": out, "attention_mask": mask, "labels": labels, "rewards": rewards,
                "lengths": keep.sum(-1)}

    def rewards(self, rows, g, prompt, pmask, completion, keep, device) -> torch.Tensor:
        """``reward_fn``'s rewards of the completions, checked: one finite number each."""
        rows = [r for r in rows for _ in range(g)]
        texts = [self._decode(c[k]) for c, k in zip(completion.cpu(), keep.cpu())]
        prompts = [r.get("prompt", self._decode(p[m.bool()])) for r, p, m in zip(rows, prompt.cpu(), pmask.cpu())]
        rewards = self.reward_fn(prompts, texts, rows)
        if not isinstance(rewards, (list, tuple, torch.Tensor)) or len(rewards) != len(texts):
            raise ValueError(f"reward_fn must return one number per completion ({len(texts)}), got "
                             f"{type(rewards).__name__} of length {len(rewards) if hasattr(rewards, '__len__') else '?'}")
        rewards = torch.tensor([float(r) for r in rewards], dtype=torch.float32, device=device)
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError("reward_fn returned a NaN or infinite reward")
        return rewards

    def _decode(self, ids: torch.Tensor):
        ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ids

    def reference_logps(self, r: dict, bf16=False) -> Optional[torch.Tensor]:
        """(N, T) pi_ref log-probs of the rollout's tokens, no graph; None without a KL term."""
        if not self.kl_beta or self.reference is None:
            return None
        args = (r["input_ids"], r["attention_mask"], r["labels"], bf16, self.loss_chunk_size)
        with torch.no_grad():
            if isinstance(self.reference, AdapterReference):
                model = self.reference.model
                with eval_mode(model), disable_adapters(model):
                    return token_logps(model, *args)
            model = self.reference.model
            device = r["input_ids"].device
            if not self.reference.placed and any(p.device != device for p in model.parameters()):
                model.to(device)
            out = token_logps(model, *args)
            reshard(model)  # a sharded copy's root stays gathered after its forward (for its lm_head)
            return out

    def batch_terms(self, model, batch, device, bf16=False, stop=None):
        """Rollouts of one prompt micro-batch and their per-completion (losses, kl, clipped),
        rewards and lengths."""
        r = self.rollout(model, batch, device, bf16, stop=stop)
        ref = self.reference_logps(r, bf16)
        logps = token_logps(model, r["input_ids"], r["attention_mask"], r["labels"], bf16, self.loss_chunk_size)
        mask = shift_labels(r["labels"]) != IGNORE_INDEX
        adv = group_advantages(r["rewards"], self.group_size)
        losses, kl, clipped = grpo_loss(logps, logps.detach(), ref, adv, mask, self.clip_eps, self.kl_beta)
        return losses, kl, clipped, r["rewards"], r["lengths"]

    def step(self, model, micro_batches, device, bf16=False, shard=None):
        """Rollouts, forward and backward over one step's prompt micro-batches; the loss is the
        mean over all completions of the step (each completion's own token mean first).

        Args:
            shard: under torchrun, this rank's `minift.distributed.parallel.Shard` (every rank
                passes the same ``micro_batches``): the rank runs its share (``split_prompts``),
                each completion's loss is divided by the completions of all ranks and
                back-propagated times the world size (FSDP / DDP average gradients), decoding
                stops when every rank's rows have ended, and the returned numbers are global.

        Returns (loss, completion tokens trained, metrics: the completions, reward mean/std, KL,
        clip fraction, mean completion length, the means as 0-d tensors read with the loss).
        """
        device = torch.device(device)
        n = sum(completions(b, self.group_size) for b in micro_batches)  # of all ranks: host batches
        sums = torch.zeros(len(SUMS), dtype=torch.float64, device=device)
        lengths = []
        stop = None if shard is None else ranks_ended(shard)

        def loss_sum(model, batch, device):
            nonlocal sums
            losses, kl, clipped, reward, length = self.batch_terms(model, batch, device, bf16, stop)
            if batch.get("blank"):
                return losses.sum() * 0  # the backward still runs: FSDP reduce-scatters in it
            sums = sums + torch.stack([reward.sum(), (reward * reward).sum(), kl.sum(), clipped.sum(),
                                       length.sum()]).double()  # on the device: no sync
            lengths.append(length)
            return losses.sum()

        if shard is None:
            total = torch.zeros((), device=device)
            for batch in micro_batches:
                loss = loss_sum(model, batch, device) / n
                loss.backward()
                total += loss.detach()
            # read on the host: a planning trace's replayed lengths are real
            trained = known(lambda: torch.cat(lengths).sum(), n * self.max_new_tokens)
        else:
            with host_read():  # prompts of host batches
                local = split_prompts(micro_batches, shard.rank, shard.world)
            total, _ = accumulate_over_ranks(model, local, device, loss_sum,
                                             lambda b: completions(b, self.group_size), n)
            sums = shard.sum(sums)
            trained = known(sums[SUMS.index("length")], n * self.max_new_tokens)
        return total, int(trained), dict(completions=n, **_metric_means(sums, n))

    @torch.no_grad()
    def evaluate(self, model, rows, config, device, shard=None) -> dict:
        """Mean reward of one greedy completion per prompt of ``rows``; eval_loss is its negative
        (the loop tracks a loss). With a ``shard`` (torchrun; every rank calls it) each rank
        rolls out its share of the batches (``eval_share``) and every rank returns the global
        means."""
        device = torch.device(device)
        batches = self.batches(rows, config.micro_batch_size, config.pad_id, shuffle=False)
        stop = None
        if shard is not None:
            with host_read():
                batches = eval_share(batches, shard.rank, shard.world)
            stop = ranks_ended(shard)
        sums = torch.zeros(2, dtype=torch.float64)
        for batch in batches:
            r = self.rollout(model, batch, device, config.bf16, greedy=True, stop=stop)
            if not batch.get("blank"):
                sums += torch.stack([r["rewards"].double().sum(), r["lengths"].double().sum()]).cpu()
        if shard is not None:
            sums = shard.sum(sums)
        reward, length = (float(v) / len(rows) for v in sums)
        return {"eval_loss": -reward, "eval_reward": reward, "eval_completion_length": length}

    @torch.no_grad()
    def finite_on(self, model, batch, device, config) -> bool:
        """Whether the loss of one prompt micro-batch's rollouts is finite."""
        return bool(torch.isfinite(self.batch_terms(model, batch, torch.device(device), config.bf16)[0]).all())

    def frozen_models(self) -> tuple:
        return (self.reference.model,) if isinstance(self.reference, ModelReference) else ()

    def distribute(self, shard, place):
        """Under torchrun, once the policy is sharded (every rank calls it): a frozen reference
        copy is laid out like the policy by ``place`` (FSDP-sharded, or on the rank's device
        under DDP); the adapters-off reference is the policy itself and needs nothing."""
        if isinstance(self.reference, ModelReference):
            self.reference.place(place)


def _metric_means(sums: torch.Tensor, n: int) -> dict:
    """METRICS from the step's SUMS over ``n`` completions, as 0-d float64 tensors where ``sums``
    lives (read by the loop with the loss); the reward's std with Bessel's correction."""
    count = torch.full((), max(n, 1), dtype=torch.float64, device=sums.device)
    reward, squared, kl, clipped, length = sums.unbind()
    mean = reward / count
    std = ((squared - reward * mean) / (count - 1).clamp(min=1)).clamp(min=0).sqrt()
    return dict(zip(METRICS, (mean, std, kl / count, clipped / count, length / count)))


def _eos_tensor(model, eos, device) -> torch.Tensor:
    if eos is None:
        eos = getattr(unwrap(model).config, "eos_token_id", None)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(ids, dtype=torch.long, device=device)


def objective_for(model, config, reward_fn, tokenizer=None) -> GRPOObjective:
    """The GRPOObjective a TrainConfig asks for, built before any checkpoint is loaded: the
    reference is the model as given (adapters off with LoRA/QLoRA, else a frozen copy)."""
    reference = None
    if config.grpo_kl_beta:
        reference = AdapterReference(model) if lora_layers(model) else ModelReference.copy_of(model)
    return GRPOObjective(reference, reward_fn, tokenizer, group_size=config.grpo_group_size,
                         max_new_tokens=config.grpo_max_new_tokens, kl_beta=config.grpo_kl_beta,
                         clip_eps=config.grpo_clip_eps, temperature=config.grpo_temperature,
                         pad_id=config.pad_id, loss_chunk_size=config.loss_chunk_size)

