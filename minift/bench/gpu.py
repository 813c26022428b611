"""``python -m minift bench gpu --out DIR``: the one-command GPU suite.

Random weights from presets, nothing downloaded, one JSON with every raw timing. In order:
device-to-device copy bandwidth and bf16 matmul throughput (the yardsticks), every Triton kernel
against its pure-torch reference, NF4 dequantization against the copy bandwidth, the 8-bit AdamW
step against its bandwidth floor and ``torch.optim.AdamW(fused=True)``, the norm / RoPE / SwiGLU
ops eager against ``torch.compile``, attention over padded and packed batches (FlexAttention on
CUDA), one Llama-3.1-8B-shaped training step per method beside `estimate_memory`, the same step in
transformers + peft (+ bitsandbytes) where they import, FSDP2 on one GPU, and minift's step with
activation offload, paged 8-bit states and compiled layers.

Made for a GPU lent once for a few minutes:

* the JSON is rewritten and one line printed after every part, so whatever ends the run (the
  call's time limit, a hang, a crash) the parts before it are on disk;
* a part that runs past its deadline (its planned seconds, three times over, plus a minute) is
  taken for hung: the watchdog records it, writes the JSON and ends the process (exit code 3);
  ``--only`` runs the parts after it in a new call;
* ``--budget-s`` plans the whole run, setup included: each part carries an estimate of its
  untimed work (building and quantizing 8B models, compiling), timings are shared out from what
  is left, and a part that no longer fits is skipped with the ``--only`` that runs it;
* kernel timings are loops of calls between one pair of events (launch overhead hidden) and
  single calls after an L2 flush (the cold-cache figure), the first 50 MB of L2 holding small
  weights otherwise;
* the peer stack runs in a child process started in a temporary directory: run from the
  repository's root, the top-level ``kernels/`` folder would shadow the PyPI package of that name
  that transformers and bitsandbytes import.

Each part runs guarded (an error, an out-of-memory included, is recorded and the suite goes on).
``--dry-run`` runs the same code on CPU with tiny shapes: it checks the suite, its timings mean
nothing.
"""
from __future__ import annotations

import functools
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from minift.bench import gpu_features as bench_gpu_features
from minift.bench import gpu_fsdp as bench_gpu_fsdp
from minift.bench import gpu_steps as bench_gpu_steps
from minift.bench.runinfo import git_commit, git_modified, machine_info
from minift.models import fused
from minift.nf4.quantize import _dequantize_reference, dequantize_nf4, quantize_nf4
from minift.optim import AdamW8bit
from minift.optim.quant8 import StepScalars, adamw8bit_step_reference, quantize_blockwise
from minift.quantmaps import dynamic_map

try:  # the launchers need Triton; without it the kernel checks are skipped
    from minift.kernels.adamw8bit import adamw8bit_step, adamw8bit_step_many
    from minift.kernels.nf4 import nf4_dequantize
except ImportError:  # pragma: no cover - platforms without Triton
    adamw8bit_step = adamw8bit_step_many = nf4_dequantize = None


@dataclass
class Sizes:
    """The shapes of one run: the real ones on a GPU, tiny ones for --dry-run."""

    nf4_shapes: tuple = ((4096, 4096), (4096, 14336), (8192, 28672))
    adam_numel: int = 100_000_000
    copy_mib: int = 1024
    matmul_n: int = 8192
    tokens: int = 4096  # 2 x 2048 rows through the norm / RoPE / SwiGLU ops
    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    head_dim: int = 128
    preset: str = "llama-3.1-8b"
    batch: int = 2
    seq_len: int = 2048
    iters: int = 20  # timed repetitions per measurement, at most (the part's budget may cut)
    loop_calls: int = 20  # kernel calls between one pair of events in a loop timing
    flush_mib: int = 256  # written before each cold-cache kernel call (H100/H200 L2: 50 MB)
    lora_layers: int = 32  # the 8-bit AdamW step of a LoRA model: r on every linear of these layers
    lora_rank: int = 16


DRY_SIZES = Sizes(nf4_shapes=((64, 64), (64, 192), (128, 256)), adam_numel=4096, copy_mib=1,
                  matmul_n=64, tokens=32, hidden=64, intermediate=128, heads=4, head_dim=16,
                  preset="tiny", batch=2, seq_len=16, iters=2, loop_calls=2, flush_mib=1, lora_layers=1,
                  lora_rank=4)


class Clock:
    """Times a callable: CUDA events on a GPU (after warm-up and a sync), perf_counter on CPU."""

    def __init__(self, device: torch.device, iters: int, warmup: int = 2):
        self.device, self.iters, self.warmup = device, iters, warmup

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def times_ms(self, fn, seconds: float, warmup=None) -> list:
        """Milliseconds of each timed call after `warmup` untimed ones (default the clock's): up
        to `iters` calls, fewer when `seconds` run out (at least one)."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        self.sync()
        out, start = [], time.perf_counter()
        while len(out) < self.iters and (not out or time.perf_counter() - start < seconds):
            if self.device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                out.append(begin.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e3)
        return out

    def kernel_ms(self, fn, seconds: float, loop_calls: int, flush_mib: int) -> dict:
        """A kernel's time two ways, half of `seconds` each, after the warm-up calls.

        ``loop_ms``: per call, from loops of `loop_calls` calls between one pair of events (the
        host runs ahead, so launch overhead is hidden as in a training step; the operands stay in
        L2 when they fit). ``cold_ms``: one call between its events right after `flush_mib` MiB
        are written (the operands come from memory); every sample is queued before the one sync
        at the end, so the host stays ahead here too."""
        for _ in range(self.warmup):
            fn()
        flush = torch.empty(flush_mib * 2**20, dtype=torch.uint8, device=self.device)
        cuda = self.device.type == "cuda"
        loop, cold = [], []

        def timed(body):
            if cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                body()
                end.record()
                return lambda: begin.elapsed_time(end)
            t0 = time.perf_counter()
            body()
            ms = (time.perf_counter() - t0) * 1e3
            return lambda: ms

        def loop_body():
            for _ in range(loop_calls):
                fn()

        for samples, body, per in ((loop, loop_body, loop_calls), (cold, fn, 1)):
            self.sync()
            pending, start = [], time.perf_counter()
            while len(pending) < self.iters and (not pending or time.perf_counter() - start < seconds / 2):
                if body is fn:
                    flush.zero_()
                pending.append(timed(body))
                if cuda and len(pending) % 4 == 0:  # bound how far the host runs ahead
                    torch.cuda.synchronize(self.device)
            self.sync()
            samples.extend(read() / per for read in pending)
        return {"loop_ms": loop, "loop_calls": loop_calls, "cold_ms": cold, "flush_bytes": flush.numel()}


def _median(ms: list) -> float:
    return statistics.median(ms)


# ---- the yardsticks ----------------------------------------------------------------------
def part_copy_bandwidth(ctx) -> dict:
    """Device-to-device copy: bytes read + written per second (the bandwidth kernels can reach)."""
    n = ctx.sizes.copy_mib * 2**20 // 4
    src = torch.randn(n, device=ctx.device)
    dst = torch.empty_like(src)
    ms = ctx.clock.times_ms(lambda: dst.copy_(src), ctx.seconds)
    ctx.copy_bytes_per_s = 2 * src.nbytes / (_median(ms) / 1e3)
    return {"bytes": 2 * src.nbytes, "ms": ms, "bytes_per_s": ctx.copy_bytes_per_s}


def part_matmul_flops(ctx) -> dict:
    """bf16 matmul throughput of an n x n x n product: the peak that MFU divides by."""
    n = ctx.sizes.matmul_n
    a, b = torch.randn(2, n, n, device=ctx.device, dtype=torch.bfloat16)
    ms = ctx.clock.times_ms(lambda: a @ b, ctx.seconds)
    ctx.peak_flops = 2 * n**3 / (_median(ms) / 1e3)
    return {"n": n, "ms": ms, "flops_per_s": ctx.peak_flops}


# ---- correctness on the device -----------------------------------------------------------
def part_kernel_checks(ctx) -> dict:
    """Every Triton kernel against its reference on odd shapes: exact equality expected."""
    if nf4_dequantize is None:
        return {"skipped": "Triton is not installed"}
    if ctx.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"}
    out = {}
    w = torch.randn(3 * 64 + 1, 37, device=ctx.device, dtype=torch.bfloat16)  # odd n: half a byte
    q = quantize_nf4(w)
    got = nf4_dequantize(q.packed, q.absmax, q.code, q.shape, q.blocksize, torch.bfloat16,
                         nested_absmax=q.nested_absmax, nested_code=q.nested_code, offset=q.offset,
                         nested_blocksize=q.nested_blocksize)
    ref = _dequantize_reference(q, torch.bfloat16)
    out["nf4_dequant"] = {"equal": bool(torch.equal(got, ref)),
                          "max_abs_diff": float((got.float() - ref.float()).abs().max())}
    for dtype in (torch.float32, torch.bfloat16):
        args = _adam_inputs(3 * 256 + 37, dtype, ctx.device)
        ref_t = [t.clone() for t in args[0]]
        got_t = [t.clone() for t in args[0]]
        adamw8bit_step_reference(ref_t[0], args[1], *ref_t[1:], *args[2], args[3], offset=256)
        adamw8bit_step(got_t[0], args[1], *got_t[1:], *args[2], args[3], offset=256)
        diffs = [int((a != b).sum()) for a, b in zip(ref_t, got_t)]
        out[f"adamw8bit_{str(dtype).split('.')[-1]}"] = {"equal": not any(diffs),
                                                         "differing_elements": diffs}
    out["adamw8bit_many"] = _adam_many_check(ctx.device)
    out["fused"] = _fused_checks(ctx.device)  # bf16: rounding differences, not equality, expected
    return out


def _adam_inputs(n, dtype, device):
    mm, mv = dynamic_map(True, device), dynamic_map(False, device)
    mc, ma = quantize_blockwise(torch.randn(n, device=device) * 1e-3, mm)
    vc, va = quantize_blockwise(torch.rand(n, device=device) * 1e-5, mv)
    p = torch.randn(n, device=device).to(dtype)
    g = torch.randn(n, device=device) * 1e-2
    s = StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.01, step=3, seed=7)
    return [p, mc, ma, vc, va], g, (mm, mv), s


def _adam_many_check(device) -> dict:
    """The multi-tensor launch on slices of three dtypes and roundings (and an empty one) against
    the reference slice by slice."""
    specs = [(3 * 256 + 37, torch.bfloat16, True), (1000, torch.float32, False), (256, torch.bfloat16, False),
             (0, torch.float32, False)]
    slices, refs = [], []
    for i, (n, dtype, stochastic) in enumerate(specs):
        tensors, g, maps, s = _adam_inputs(n, dtype, device)
        s = StepScalars.make(1e-3, 0.9, 0.999, 1e-8, 0.01, step=3, seed=11 + i)
        got, ref = [t.clone() for t in tensors], [t.clone() for t in tensors]
        slices.append((got[0], g, *got[1:], s, 256 * i, stochastic))
        refs.append((ref, g, s, 256 * i, stochastic))
    launches = adamw8bit_step_many(slices, *maps)
    diffs = []
    for sl, (ref, g, s, offset, stochastic) in zip(slices, refs):
        adamw8bit_step_reference(ref[0], g, *ref[1:], *maps, s, offset=offset, stochastic=stochastic)
        got = [sl[0], *sl[2:6]]
        diffs.append([int((a != b).sum()) for a, b in zip(ref, got)])
    return {"equal": not any(map(any, diffs)), "differing_elements": diffs, "launches": launches}


def _lora_shapes(sizes) -> list:
    """(rows, cols) of the A and B factors of rank-r LoRA on q, k, v, o, gate, up, down of
    ``lora_layers`` layers (k and v with a quarter of the hidden width: GQA 4:1)."""
    h, kv, inter, r = sizes.hidden, sizes.hidden // 4, sizes.intermediate, sizes.lora_rank
    per_layer = [(r, h), (h, r), (r, h), (kv, r), (r, h), (kv, r), (r, h), (h, r),
                 (r, h), (inter, r), (r, h), (inter, r), (r, inter), (h, r)]
    return per_layer * sizes.lora_layers


def _lora_step(ctx) -> dict:
    """The 8-bit AdamW step of a LoRA model's fp32 factors: one multi-tensor launch against one
    launch per tensor (same tensors, same work: the difference is launch overhead), and the
    whole ``AdamW8bit.step`` (finiteness check and its one sync included)."""
    if ctx.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return {"skipped": "Triton kernels need CUDA (or TRITON_INTERPRET=1 on CPU)"}
    params = [torch.nn.Parameter(torch.randn(shape, device=ctx.device) * 0.02) for shape in _lora_shapes(ctx.sizes)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = AdamW8bit(params, lr=1e-4, min_8bit_size=0)
    opt.step()  # creates the states
    maps = (dynamic_map(True, ctx.device), dynamic_map(False, ctx.device))
    s = StepScalars.make(1e-4, 0.9, 0.999, 1e-8, 0.0, step=2)
    slices = [(p.view(-1), p.grad.view(-1), *(opt.state[p][k] for k in
               ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")),
               StepScalars.make(1e-4, 0.9, 0.999, 1e-8, 0.0, step=2, seed=i), 0, False)
              for i, p in enumerate(params)]
    numel = sum(p.numel() for p in params)
    floor_bytes = numel * (4 + 4 + 4 + 2 + 2) + 4 * 4 * -(-numel // 256)  # as part_adamw8bit, plus scales
    share = ctx.seconds / 6
    return {"tensors": len(params), "numel": numel, "floor_bytes": floor_bytes,
            "floor_ms": floor_bytes / ctx.copy_bytes_per_s * 1e3 if ctx.copy_bytes_per_s else None,
            "one_launch_ms": ctx.clock.times_ms(lambda: adamw8bit_step_many(slices, *maps), share),
            "per_tensor_launches_ms": ctx.clock.times_ms(
                lambda: [adamw8bit_step(*sl[:6], *maps, s, 0, False) for sl in slices], share),
            "optimizer_step_ms": ctx.clock.times_ms(opt.step, share)}


# ---- bandwidth-bound kernels ---------------------------------------------------------------
def _rates(timing: dict, moved: int, copy_bytes_per_s: float) -> dict:
    """Bytes per second of the loop and the cold timings, and their shares of the copy bandwidth."""
    out = {}
    for kind in ("loop", "cold"):
        rate = moved / (_median(timing[f"{kind}_ms"]) / 1e3)
        out[f"bytes_per_s_{kind}"] = rate
        out[f"share_of_copy_{kind}"] = rate / copy_bytes_per_s if copy_bytes_per_s else None
    return out


def part_nf4_dequant(ctx) -> dict:
    """NF4 -> bf16 of each weight shape: bytes moved per second against the copy bandwidth. The
    cold-cache share is the one the 85% goal is about (a 4096 x 4096 weight fits in L2)."""
    out = {}
    s = ctx.sizes
    for rows, cols in s.nf4_shapes:
        q = quantize_nf4(torch.randn(rows, cols, device=ctx.device, dtype=torch.bfloat16))
        buf = torch.empty(rows, cols, device=ctx.device, dtype=torch.bfloat16)
        run = functools.partial(dequantize_nf4, q, torch.bfloat16, out=buf)
        timing = ctx.clock.kernel_ms(run, ctx.seconds / len(s.nf4_shapes), s.loop_calls, s.flush_mib)
        moved = q.nbytes + buf.nbytes  # read the packed weight and its scales, write bf16
        out[f"{rows}x{cols}"] = {"bytes": moved, **timing, **_rates(timing, moved, ctx.copy_bytes_per_s),
                                 "goal_share": 0.85}
        del q, buf, run  # free this shape's tensors before the next one is made
    return out


def lora_parameter_shapes(config, r: int) -> list:
    """The (rows, cols) of every LoRA A and B matrix of rank `r` on all decoder linears."""
    shapes = []
    for _ in range(config.num_hidden_layers):
        for inp, outp in config.linear_shapes().values():
            shapes += [(r, inp), (outp, r)]
    return shapes


def _adam_step_row(ctx, opt, params, seconds) -> dict:
    s = ctx.sizes
    n = sum(p.numel() for p in params)
    timing = ctx.clock.kernel_ms(opt.step, seconds, s.loop_calls, s.flush_mib)
    # param read + write, grad read twice (the non-finite check, then the step), two 8-bit states
    # read + written; the absmax scales are 1/256 of that and left out
    per = 2 * params[0].element_size() + 2 * params[0].grad.element_size() + 4
    floor = n * per
    row = {"numel": n, "tensors": len(params), **timing, "floor_bytes": floor,
           "floor_ms": floor / ctx.copy_bytes_per_s * 1e3 if ctx.copy_bytes_per_s else None}
    if ctx.copy_bytes_per_s:
        row["floor_share_cold"] = row["floor_ms"] / _median(timing["cold_ms"])
    return row


def part_adamw8bit(ctx) -> dict:
    """One AdamW8bit step on N fp32 parameters against its floor (the bytes it must move at copy
    bandwidth) and torch's fused fp32 AdamW on the same parameters; then the step over the many
    small tensors of LoRA (rank 16 on every decoder linear of the preset), where launches, not
    bytes, decide, and the same factors as one multi-tensor launch against one launch per tensor
    (``_lora_step``)."""
    from minift.models.config import ModelConfig
    n = ctx.sizes.adam_numel
    p = torch.nn.Parameter(torch.randn(n, device=ctx.device) * 0.02)
    p.grad = torch.randn_like(p) * 1e-3
    out = {"numel": n}
    opt8 = AdamW8bit([p], lr=1e-4)
    out["adamw8bit"] = _adam_step_row(ctx, opt8, [p], ctx.seconds / 3)
    del opt8
    fused = ctx.device.type == "cuda" or hasattr(torch, "_fused_adamw_")
    opt32 = torch.optim.AdamW([p], lr=1e-4, fused=fused)
    s = ctx.sizes
    out["torch_adamw_fused"] = {"fused": fused, **ctx.clock.kernel_ms(opt32.step, ctx.seconds / 3,
                                                                      s.loop_calls, s.flush_mib)}
    del opt32, p
    shapes = lora_parameter_shapes(ModelConfig.from_name(s.preset), 16)
    lora = [torch.nn.Parameter(torch.randn(*shape, device=ctx.device) * 0.02) for shape in shapes]
    for q in lora:
        q.grad = torch.randn_like(q) * 1e-3
    out["adamw8bit_lora_r16"] = _adam_step_row(ctx, AdamW8bit(lora, lr=1e-4), lora, ctx.seconds / 3)
    out["lora_launches"] = _lora_step(ctx)
    return out


def _fused_inputs(sizes, device, requires_grad=False):
    """(reference, fused, args) per op at a training step's shapes, bf16; k has a quarter of
    q's heads (GQA 4:1)."""
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, requires_grad=requires_grad)

    s = sizes
    x, w = rand(s.tokens, s.hidden), torch.randn(s.hidden, device=device, dtype=torch.bfloat16)
    q, k = rand(1, s.heads, s.tokens, s.head_dim), rand(1, s.heads // 4, s.tokens, s.head_dim)
    cos, sin = torch.randn(2, 1, 1, s.tokens, s.head_dim, device=device, dtype=torch.bfloat16)
    gate, up = rand(s.tokens, s.intermediate), rand(s.tokens, s.intermediate)
    return {"rmsnorm": (fused.rms_norm_reference, fused.rms_norm, (x, w, 1e-5)),
            "rope": (fused.apply_rope_reference, fused.apply_rope, (q, k, cos, sin)),
            "swiglu": (fused.swiglu_reference, fused.swiglu, (gate, up))}


def part_fused_ops(ctx) -> dict:
    """RMSNorm, RoPE (q and k, GQA 4:1) and SwiGLU at a training step's shapes: minift's fused
    kernels against torch eager and torch.compile of the same reference, forward only."""
    out = {}
    s = ctx.sizes
    for name, (reference, fast, args) in _fused_inputs(s, ctx.device).items():
        share = ctx.seconds / 9
        row = {"eager": ctx.clock.kernel_ms(lambda: reference(*args), share, s.loop_calls, s.flush_mib)}
        compiled = torch.compile(reference)
        row["compiled"] = ctx.clock.kernel_ms(lambda: compiled(*args), share, s.loop_calls, s.flush_mib)
        if fused.uses_triton(args[0]):
            row["fused"] = ctx.clock.kernel_ms(lambda: fast(*args), share, s.loop_calls, s.flush_mib)
        else:
            row["fused"] = "not on this device (the reference serves off CUDA)"
        out[name] = row
    return out


def _fused_checks(device) -> dict:
    """Each fused op's forward and input gradients against its reference (bf16, small shapes)."""
    out = {}
    for name, (reference, fast, args) in _fused_inputs(DRY_SIZES, device, requires_grad=True).items():
        ref, got = _as_tuple(reference(*args)), _as_tuple(fast(*args))
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        grads_ref = torch.autograd.grad(sum(r.float().sum() for r in ref), leaves)
        grads_got = torch.autograd.grad(sum(g.float().sum() for g in got), leaves)
        out[name] = {"forward_max_abs_diff": _max_diff(ref, got),
                     "grad_max_abs_diff": _max_diff(grads_ref, grads_got)}
    return out


def _as_tuple(t):
    return (t,) if isinstance(t, torch.Tensor) else tuple(t)


def _max_diff(a, b) -> float:
    return max(float((x.detach().float() - y.detach().float()).abs().max()) for x, y in zip(a, b))


# ---- the suite -----------------------------------------------------------------------------
@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    dry_run: bool
    clock: Clock
    seconds: float = 0.0  # the running part's budget
    copy_bytes_per_s: float = 0.0
    peak_flops: float = 0.0


@dataclass(frozen=True)
class Part:
    """One part of the suite: its function, the seconds of timing it gets on a GPU, and an
    estimate of its untimed work there (building and quantizing models, compiling, starting a
    process). The estimates are guesses until a GPU run's ``wall_s`` per part replaces them."""

    name: str
    run: object
    seconds: float
    setup_s: float


PARTS = (Part("copy_bandwidth", part_copy_bandwidth, 5, 2),
         Part("matmul_flops", part_matmul_flops, 5, 3),
         Part("kernel_checks", part_kernel_checks, 5, 20),
         Part("nf4_dequant", part_nf4_dequant, 20, 25),
         Part("adamw8bit", part_adamw8bit, 20, 10),
         Part("fused_ops", part_fused_ops, 30, 60),
         Part("attention", bench_gpu_features.part_attention, 20, 30),
         Part("train_steps", bench_gpu_steps.part_train_steps, 90, 60),
         Part("peer_steps", bench_gpu_steps.part_peer_steps, 60, 90),
         Part("fsdp", bench_gpu_fsdp.part_fsdp, 20, 40),
         Part("feature_steps", bench_gpu_features.part_feature_steps, 80, 150))
PART_NAMES = tuple(p.name for p in PARTS)
DEFAULT_BUDGET_S = 540.0  # one device call is at most 600 s
MIN_SCALE = 0.5  # timings shrink to half their seconds before parts are dropped
DRY_SCALE = 0.02  # the dry run: a fiftieth of each part's seconds, no setup estimate
HANG_MARGIN_S = 60.0  # a part is hung after three times its planned seconds and this margin


def plan(parts, budget_s: float, dry_run: bool) -> tuple[float, dict]:
    """(scale of every part's timing seconds, {part: planned seconds or the reason it is left
    out}) for `budget_s`, setup counted; parts are kept in order while they fit."""
    setup = {p.name: 0.0 if dry_run else p.setup_s for p in parts}
    timing = {p.name: p.seconds * (DRY_SCALE if dry_run else 1.0) for p in parts}
    room = budget_s - sum(setup.values())
    scale = 1.0 if room >= sum(timing.values()) else max(MIN_SCALE, room / max(sum(timing.values()), 1e-9))
    planned, used = {}, 0.0
    for p in parts:
        need = setup[p.name] + timing[p.name] * scale
        if used + need <= budget_s:
            planned[p.name], used = need, used + need
        else:
            planned[p.name] = (f"does not fit: needs ~{need:.0f} s (setup ~{setup[p.name]:.0f} s), "
                               f"{max(budget_s - used, 0):.0f} s of --budget-s left; run it with --only {p.name}")
    return scale, planned


class Record:
    """The suite's JSON, rewritten (atomically) whenever a part ends."""

    def __init__(self, path: str, record: dict):
        self.path, self.record, self.lock = path, record, threading.Lock()

    def write(self) -> None:
        with self.lock:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.record, f, indent=2, default=str)
            os.replace(tmp, self.path)


def _hung(record: Record, name: str, limit: float, later: list) -> None:
    """The watchdog's end of a hung part: recorded, written, the process ended (exit code 3)."""
    record.record["results"][name] = {
        "error": f"hung: still running after {limit:.0f} s; the suite stopped here"
                 + (f" (run the rest with --only {' '.join(later)})" if later else "")}
    record.record["stopped_by_watchdog"] = name
    record.write()
    print(f"part {name}: hung after {limit:.0f} s; wrote {record.path}; stopping", flush=True)
    os._exit(3)


def run_suite(device: torch.device, dry_run: bool, budget_s: float, only=None,
              record: Record = None) -> dict:
    """Every part in order, each guarded, watched and within its planned share of `budget_s`; the
    results (also in ``record``, written after each part, when given)."""
    sizes = DRY_SIZES if dry_run else Sizes()
    ctx = Context(device, sizes, dry_run, Clock(device, sizes.iters, warmup=1 if dry_run else 2))
    parts = [p for p in PARTS if not only or p.name in only]
    scale, planned = plan(parts, budget_s, dry_run)
    results = record.record["results"] if record is not None else {}
    if record is not None:
        record.record["plan"] = {"timing_scale": scale, "parts": planned}
    deadline = time.monotonic() + budget_s
    for i, part in enumerate(parts):
        name, left = part.name, deadline - time.monotonic()
        want = planned[name]
        setup = 0.0 if dry_run else part.setup_s
        if isinstance(want, str):
            results[name] = {"skipped": want}
        elif left < setup + (want - setup) * MIN_SCALE:
            results[name] = {"skipped": f"the suite's time budget is spent ({max(left, 0):.0f} s left, "
                                        f"~{want:.0f} s planned); run it with --only {name}"}
        else:
            ctx.seconds = min(want - setup, left - setup)
            limit = 3 * want + HANG_MARGIN_S
            later = [p.name for p in parts[i + 1:]]
            watchdog = threading.Timer(limit, _hung, (record, name, limit, later)) if record is not None else None
            if watchdog is not None:
                watchdog.daemon = True
                watchdog.start()
            t0 = time.monotonic()
            try:
                results[name] = part.run(ctx)
            except Exception as e:  # noqa: BLE001 - one failing part (an OOM too) must not end the suite
                results[name] = {"error": f"{type(e).__name__}: {e}",
                                 "traceback": traceback.format_exc(limit=6)}
            finally:
                if watchdog is not None:
                    watchdog.cancel()
            results[name]["wall_s"] = time.monotonic() - t0
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if record is not None:
            record.record["wall_s"] = time.time() - record.record["started"]
            record.write()
        r = results[name]
        state = ("error: " + r["error"].splitlines()[0][:200]) if "error" in r else \
            ("skipped: " + r["skipped"]) if "skipped" in r else f"ok in {r['wall_s']:.1f} s"
        print(f"part {name}: {state}", flush=True)
    return results


def add_bench_gpu_arguments(parser) -> None:
    """The options of ``minift bench gpu``."""
    parser.add_argument("--out", required=True, help="directory for bench_gpu.json")
    parser.add_argument("--dry-run", action="store_true", dest="dry_run",
                        help="tiny shapes on CPU: checks the suite, measures nothing")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, dest="budget_s",
                        help="seconds for the whole suite, setup included, planned part by part "
                             f"(default {DEFAULT_BUDGET_S:.0f}); parts that do not fit are skipped "
                             "with the --only that runs them")
    parser.add_argument("--only", nargs="+", default=None, choices=PART_NAMES,
                        help="run only these parts")


def run_bench_gpu(args, parser) -> int:
    """Run ``minift bench gpu`` for parsed `args`; bad input goes through `parser.error`."""
    if not (math.isfinite(args.budget_s) and args.budget_s > 0):
        parser.error(f"--budget-s must be a finite number > 0, got {args.budget_s}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: the GPU suite needs one (--dry-run checks it on CPU)")
    device = torch.device("cpu" if args.dry_run else "cuda")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        parser.error(f"--out: cannot create {args.out!r}: {e.strerror}")
    threads = torch.get_num_threads()
    path = os.path.join(args.out, "bench_gpu.json")
    record = Record(path, {
        "command": " ".join(["python -m minift"] + sys.argv[1:]), "dry_run": args.dry_run,
        "arguments": {k: getattr(args, k) for k in ("out", "dry_run", "budget_s", "only")},
        "machine": machine_info(), "versions": _versions(), "git_commit": git_commit(),
        "git_modified": git_modified(), "device": _device_info(device),
        "sizes": asdict(DRY_SIZES if args.dry_run else Sizes()), "budget_s": args.budget_s,
        "started": time.time(), "wall_s": 0.0, "results": {}})
    record.write()
    print(f"writing {path} after every part", flush=True)
    if args.dry_run:  # tiny ops: one thread avoids thread start-up cost dwarfing the work
        torch.set_num_threads(1)
    try:
        results = run_suite(device, args.dry_run, args.budget_s, args.only, record)
    finally:
        torch.set_num_threads(threads)
    failed = [k for k, v in results.items() if "error" in v]
    print(f"wrote {path}; parts with errors: {', '.join(failed) or 'none'}")
    return 0


def _versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def _device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"type": device.type}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory, "multiprocessors": props.multi_processor_count}
