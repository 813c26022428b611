"""8-bit AdamW: blockwise-quantized moments, a fused step on CUDA, optional CPU paging.

State per parameter (``self.state[p]``), with ``n = p.numel()``:

* ``n >= min_8bit_size``: ``exp_avg_codes`` uint8 (n,) + ``exp_avg_absmax`` float32
  (ceil(n/256),) on the signed dynamic map; ``exp_avg_sq_codes`` / ``exp_avg_sq_absmax`` on the
  unsigned map: 2 + 8/256 = 2.03125 bytes per parameter.
* smaller tensors: ``exp_avg`` / ``exp_avg_sq`` float32 of p's shape (8 bytes per parameter).
* ``step``: int, the number of updates this parameter received.

Sharded parameters (FSDP2's DTensors) are stepped shard by shard: each rank updates its own
rows and keeps the states of those rows only (``minift.optim.sharded``), with ``n`` the local
numel; rows that are not a multiple of 256 elements keep float32 moments there.

The math and its order are in ``minift.optim.quant8``; docs/optim.md has the state-dict format.
"""
from __future__ import annotations

import copy
import math
import warnings

import torch

from minift.checks import check_int, check_number
from minift.kernels import HAS_TRITON
from minift.optim import sharded
from minift.optim.adamw8bit_state import KEYS_8BIT, VERSION, VERSION_KEY, check_state_dict, exchange_state
from minift.optim.adamw8bit_state import check_hparams as _check_hparams
from minift.optim.paging import DEFAULT_DEVICE_BUDGET, DEFAULT_PAGE_SIZE, Pager, host_empty
from minift.optim.quant8 import (
    BLOCK,
    StepScalars,
    adamw8bit_step_cpu,
    adamw32_step,
    finite_flags,
    nearest_code,
    num_blocks,
)
from minift.quantmaps import dynamic_map
from minift.tracing import known, on_cuda

if HAS_TRITON:  # the CUDA path; the torch reference serves everywhere else
    from minift.kernels.adamw8bit import adamw8bit_step, adamw8bit_step_many


def _fused(p) -> bool:
    """Whether the 8-bit step of ``p`` is the fused Triton kernel (CUDA), not the CPU step."""
    return on_cuda(p) and HAS_TRITON


def _step8(p, g, states, maps, s: StepScalars, offset: int, stochastic: bool) -> None:
    """One 8-bit step on flat slices: the fused kernel on CUDA, the fast torch step elsewhere."""
    m_codes, m_absmax, v_codes, v_absmax = states
    if _fused(p):
        adamw8bit_step(p, g, m_codes, m_absmax, v_codes, v_absmax, *maps, s, offset, stochastic)
    else:
        adamw8bit_step_cpu(p, g, m_codes, m_absmax, v_codes, v_absmax, *maps, s, offset,
                           stochastic)


def _step8_together(slices, maps) -> None:
    """The fused step of many slices on one device, ``slices`` as ``adamw8bit_step_many`` takes
    them: one slice launches alone (a parameter stepped from its gradient hook), more go into
    one multi-tensor launch per group of like slices (one per param group and dtype)."""
    if len(slices) == 1:
        p, g, *states, s, offset, stochastic = slices[0]
        adamw8bit_step(p, g, *states, *maps, s, offset, stochastic)
    elif slices:
        adamw8bit_step_many(slices, *maps)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise-quantized moments (decoupled weight decay, as torch's AdamW).

    Args:
        params: parameters or param-group dicts (lr, betas, eps, weight_decay and
            stochastic_rounding may differ per group).
        lr: learning rate (>= 0).
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: decoupled weight decay (>= 0); p <- p * (1 - lr * weight_decay).
        min_8bit_size: tensors with fewer elements keep float32 moments.
        paged: keep 8-bit states in host memory in pages and stream them to the parameter's
            device during ``step`` (results are bit-identical to ``paged=False``).
        stochastic_rounding: round updated bfloat16 weights stochastically (reproducible: the
            random bits are a hash of ``seed``, the step, the parameter and the element).
        seed: seed of the stochastic rounding.
        page_size: elements per page (a multiple of 256).
        device_budget_bytes: device bytes of the pages kept on the device for good (default
            1 GiB, ``minift.optim.paging.DEFAULT_DEVICE_BUDGET``); the other pages stream from
            host memory every step. ``None`` keeps all of them (then paging copies
            each page in only once and saves no device memory).
        check_finite: skip the whole step (with a warning, counted in ``skipped_steps``) when
            any gradient has NaN/Inf, so no state is corrupted. ``False`` saves one read of the
            gradients per step; non-finite gradients then poison the states.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 min_8bit_size=4096, paged=False, stochastic_rounding=False, *, seed=0,
                 page_size=DEFAULT_PAGE_SIZE, device_budget_bytes=DEFAULT_DEVICE_BUDGET, check_finite=True):
        _check_hparams(lr, betas, eps, weight_decay, "defaults")
        check_int("AdamW8bit: min_8bit_size", min_8bit_size, minimum=0)
        check_int("AdamW8bit: page_size", page_size)
        if page_size % BLOCK:
            raise ValueError(f"AdamW8bit: page_size must be a positive multiple of {BLOCK}, "
                             f"got {page_size!r}")
        check_number("AdamW8bit: device_budget_bytes", device_budget_bytes, ">= 0",
                     lambda v: v >= 0, optional=True)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        stochastic_rounding=bool(stochastic_rounding))
        super().__init__(params, defaults)
        self.min_8bit_size = min_8bit_size
        self.paged = bool(paged)
        self.seed = int(seed)
        self.page_size = page_size
        self.device_budget_bytes = device_budget_bytes
        self.check_finite = bool(check_finite)
        self.skipped_steps = 0
        self._maps = {}  # device -> (signed map, unsigned map)
        self._pagers = {}  # device -> Pager
        self._pages = {}  # parameter -> list of its Pages

    def add_param_group(self, param_group):
        # checked before torch appends the group, so a refused group leaves the optimizer as it was
        g = {**self.defaults, **param_group} if isinstance(param_group, dict) else param_group
        if isinstance(g, dict):
            _check_hparams(g["lr"], g["betas"], g["eps"], g["weight_decay"],
                           f"param group {len(self.param_groups)}")
        super().add_param_group(param_group)

    # ---- step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update of every parameter that has a gradient; returns closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = self._params_with_grad()
        if self.check_finite and not self._grads_finite(todo):
            return loss
        streamed = {}  # device -> list of (page, context) for paged parameters
        together = {}  # device -> fused 8-bit slices, launched together after the loop
        strided = []  # (parameter, flat copy) to write back after the launches
        for index, group, p in todo:
            state = self.state[p]
            if not state:
                self._init_state(p, state)
            state["step"] += 1
            s = StepScalars.make(group["lr"], *group["betas"], group["eps"], group["weight_decay"],
                                 state["step"], seed=self._step_seed(state["step"], index))
            stochastic = group["stochastic_rounding"]
            lp, lg, base = sharded.local(p), sharded.local(p.grad), sharded.flat_offset(p)
            if "exp_avg" in state:
                # the element offsets of stochastic rounding are global: a shard rounds as the
                # same rows of the whole parameter would
                adamw32_step(lp, lg, state["exp_avg"], state["exp_avg_sq"], s, stochastic, base)
            elif self.paged:
                streamed.setdefault(lp.device, []).append((p, s, stochastic))
            elif _fused(lp):
                flat = self._flat(lp, strided)
                together.setdefault(lp.device, []).append(
                    (flat, lg.reshape(-1).contiguous(), *[state[k] for k in KEYS_8BIT], s, base,
                     stochastic))
            else:
                self._update_flat(lp, lg, lambda fp, fg: _step8(
                    fp, fg, [state[k] for k in KEYS_8BIT], self._maps_on(lp.device), s, base,
                    stochastic))
        for device, slices in together.items():
            _step8_together(slices, self._maps_on(device))
        for lp, flat in strided:
            lp.copy_(flat.view_as(lp))
        for device, items in streamed.items():
            self._paged_update(device, items)
        return loss

    def _params_with_grad(self):
        todo, index = [], 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None:
                    if sharded.is_sharded(p):
                        sharded.check_placement(p, f"param_groups[{gi}]['params'][{pi}]")
                    if p.grad.is_sparse:
                        raise ValueError(f"AdamW8bit does not support sparse gradients: "
                                         f"param_groups[{gi}]['params'][{pi}] "
                                         f"(shape {tuple(p.shape)})")
                    todo.append((index, group, p))
                index += 1
        return todo

    def _grads_finite(self, todo) -> bool:
        """True when every gradient is finite; else warn, count the skip and return False.

        One host sync per step, however many tensors: each gradient's max-norm (NaN or Inf when
        it holds one, and no full-size temporary; on CPU its min and max) is reduced on the
        device, and only the final flag is read. A per-tensor read costs ~450 blocking copies a step for 7B all-linear LoRA.
        """
        if not todo:
            return True
        # this rank's rows of sharded gradients; a shard may hold no rows (a parameter with fewer
        # rows than ranks), and an empty tensor has no infinity norm
        held = [(item, sharded.local(item[2].grad)) for item in todo]
        held = [(item, g) for item, g in held if g.numel()]
        finite = torch.ones(0, dtype=torch.bool)
        if held:
            device = held[0][1].device
            grads = [g for _, g in held]
            if device.type == "cpu":  # torch's max-norm costs ~4 ns per element on CPU
                finite = finite_flags(grads)
            else:
                norms = torch._foreach_norm(grads, math.inf)
                finite = torch.isfinite(torch.stack([x.float().to(device, non_blocking=True) for x in norms]))
        if sharded.agree_all_finite(finite.all(), [p for _, _, p in todo]):  # the one sync (read after the all-reduce)
            return True
        bad = [f"#{index} (shape {tuple(p.shape)})" for ((index, _, p), _), ok in zip(held, finite.tolist())
               if not ok]
        where = f"parameter {', '.join(bad)}" if bad else "another rank's shards"
        self.skipped_steps += 1
        warnings.warn(f"AdamW8bit: skipped the step because of NaN/Inf gradients in {where}; states "
                      f"and weights are unchanged (skipped_steps={self.skipped_steps})", RuntimeWarning,
                      stacklevel=3)
        return False

    def _step_seed(self, step: int, index: int) -> int:
        # Distinct per (seed, step, parameter); the kernel hashes it with the element offset.
        return (self.seed * 1_000_003 + step * 7919 + index * 104_729) % (2**31)

    def _maps_on(self, device):
        if device not in self._maps:
            self._maps[device] = (dynamic_map(True, device), dynamic_map(False, device))
        return self._maps[device]

    def uses_8bit(self, p) -> bool:
        """Whether ``p`` gets 8-bit moments (else float32): decided on the whole parameter, so
        every rank of a sharded one decides alike."""
        return p.numel() >= self.min_8bit_size and (not sharded.is_sharded(p) or sharded.row_aligned(p))

    def _init_state(self, p, state) -> None:
        state["step"] = 0
        eight = self.uses_8bit(p)
        p = sharded.local(p)  # a sharded parameter's states cover this rank's rows only
        n = p.numel()
        if not eight:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32,
                                                memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            return
        signed, unsigned = dynamic_map(True), dynamic_map(False)
        for prefix, code in (("exp_avg", signed), ("exp_avg_sq", unsigned)):
            zero = int(known(lambda: nearest_code(torch.zeros(1), code), 0))  # the map's 0.0 entry
            codes = host_empty((n,), torch.uint8) if self.paged else \
                torch.empty(n, dtype=torch.uint8, device=p.device)
            state[prefix + "_codes"] = codes.fill_(zero)
            state[prefix + "_absmax"] = host_empty((num_blocks(n),), torch.float32) \
                if self.paged else torch.zeros(num_blocks(n), device=p.device)

    @staticmethod
    def _flat(p, strided: list) -> torch.Tensor:
        """A flat contiguous view of p, or a flat copy (then ``(p, copy)`` joins ``strided`` to
        be written back once the update ran)."""
        if p.is_contiguous():
            return p.view(-1)
        flat = p.reshape(-1).clone()
        strided.append((p, flat))
        return flat

    @staticmethod
    def _update_flat(p, grad, fn) -> None:
        """Call fn(flat_param, flat_grad) on contiguous 1-D views; copies back if p is strided."""
        flat = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
        fn(flat, grad.reshape(-1).contiguous())
        if not p.is_contiguous():
            p.copy_(flat.view_as(p))

    # ---- paging ---------------------------------------------------------------------------
    @property
    def host_bytes(self) -> int:
        """Host memory of the paged 8-bit states (0 when not paged)."""
        if not self.paged:
            return 0
        return sum(st[k].nbytes for st in self.state.values() for k in KEYS_8BIT if k in st)

    def kept_tensors(self) -> list:
        """Device copies of the pages kept on the device (within ``device_budget_bytes``)."""
        return [t for pager in self._pagers.values() for t in pager.kept_tensors()]

    def _paged_update(self, device, items) -> None:
        pager = self._pagers.get(device)
        if pager is None:
            pager = self._pagers[device] = Pager(device, self.device_budget_bytes)
        maps = self._maps_on(device)
        work = []  # (page, param, flat views, scalars, stochastic)
        for p, s, stochastic in items:
            lp, base = sharded.local(p), sharded.flat_offset(p)
            flat = lp.view(-1) if lp.is_contiguous() else lp.reshape(-1).clone()
            grad = sharded.local(p.grad).reshape(-1).contiguous()
            work += [(page, lp, flat, grad, s, stochastic, base) for page in self._pages_of(p, pager)]
        by_key = {w[0].key: w for w in work}
        kept = []  # fused slices of kept pages: they stay on the device, so they step together

        def compute(page, dev):
            _, _, flat, grad, s, stochastic, base = by_key[page.key]
            start = page.key[1] * self.page_size
            end = min(start + self.page_size, flat.numel())
            if page.kept and _fused(flat):
                kept.append((flat[start:end], grad[start:end], *dev, s, base + start, stochastic))
            else:  # a streamed page is written back right after its step: it steps alone
                _step8(flat[start:end], grad[start:end], dev, maps, s, base + start, stochastic)

        pager.run([w[0] for w in work], compute)
        # after run: every kept page's copy-in was waited for on this stream, and nothing reads
        # kept pages before the next flush, which waits for this stream
        _step8_together(kept, maps)
        for p, flat in {id(w[1]): (w[1], w[2]) for w in work}.values():
            if not p.is_contiguous():
                p.copy_(flat.view_as(p))

    def _pages_of(self, p, pager):
        """The pages of p's 8-bit state (registered with the pager on first use)."""
        if p not in self._pages:
            st, n, size = self.state[p], sharded.local(p).numel(), self.page_size
            pid = len(self._pages)
            self._pages[p] = [
                pager.add_page((pid, i), (
                    st["exp_avg_codes"][a:a + size],
                    st["exp_avg_absmax"][a // BLOCK:num_blocks(min(a + size, n))],
                    st["exp_avg_sq_codes"][a:a + size],
                    st["exp_avg_sq_absmax"][a // BLOCK:num_blocks(min(a + size, n))]))
                for i, a in enumerate(range(0, n, size))]
        return self._pages[p]

    # ---- state dict -----------------------------------------------------------------------
    def state_dict(self):
        """Like torch's (tensors are references, not copies) plus the format version.

        Layout: ``{"state": {index: {"step": int, <KEYS_8BIT or KEYS_32>: Tensor}},
        "param_groups": [...], "minift_adamw8bit_version": 1, "skipped_steps": int, "seed": int}``.
        A sharded parameter's states are DTensors in the exchange format of
        ``minift.optim.sharded`` (views of this rank's rows), which DCP saves and re-slices.
        """
        for pager in self._pagers.values():
            pager.flush()  # kept pages hold the newest state
        sd = exchange_state(self, super().state_dict())
        sd[VERSION_KEY] = VERSION
        sd["skipped_steps"] = self.skipped_steps
        sd["seed"] = self.seed
        return sd

    def load_state_dict(self, state_dict):
        """Load a state dict written by ``state_dict`` (any minift version <= this one).

        Raises:
            ValueError: not a minift AdamW8bit state dict (e.g. torch.optim.AdamW's), a newer
                version, or groups/parameters/shapes that do not match this optimizer.
        """
        new_state, groups = check_state_dict(self, state_dict)
        self.state.clear()
        self.state.update(new_state)
        for group, saved in zip(self.param_groups, groups):
            group.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.seed = int(state_dict.get("seed", self.seed))
        self._pagers, self._pages = {}, {}  # host copies are authoritative again


class PagedAdamW8bit(AdamW8bit):
    """``AdamW8bit`` with ``paged=True``: 8-bit states in host pages, streamed during ``step``."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 min_8bit_size=4096, stochastic_rounding=False, **kwargs):
        super().__init__(params, lr, betas, eps, weight_decay, min_8bit_size, True,
                         stochastic_rounding, **kwargs)
