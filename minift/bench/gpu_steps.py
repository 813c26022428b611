"""The GPU suite's training steps: minift's QLoRA, LoRA and full fine-tuning of a preset with
random weights, and the same step in transformers + peft (+ bitsandbytes) where they import.

A step is what the training loop runs: forward/backward under bf16 autocast with gradient
checkpointing, global-norm clipping, the optimizer step. Reported per method: the median step
time, tokens/s, MFU against the measured bf16 matmul peak, and peak allocated / reserved memory
of the steps after the first (optimizer states exist by then) beside `estimate_memory`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch
from torch import nn

from minift.lora.layer import lora_wrap
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.nf4.linear import quantize_model
from minift.objectives.sft import accumulate_gradients
from minift.optim import AdamW8bit

# method -> optimizer, as `python -m minift bench` pairs them
STEP_METHODS = (("qlora", "adamw"), ("lora", "adamw"), ("full", "adamw8bit"))
LORA_R = 16


def train_flops_per_token(config: ModelConfig, seq_len: int, method: str) -> float:
    """Model FLOPs of one trained token (recomputation not counted, as MFU is defined).

    Matmuls with N weights cost 2N forward and 2N for the input gradients; full fine-tuning
    adds 2N for the weight gradients (6N in all), LoRA and QLoRA skip them for the frozen base
    (4N; the rank-16 adapters add < 1%). Attention scores and their use cost 4 * T * q_size
    per layer and token forward, twice that backward.
    """
    n = sum(a * b for a, b in config.linear_shapes().values()) * config.num_hidden_layers
    n += config.hidden_size * config.vocab_size  # lm_head
    attention = 12 * config.num_hidden_layers * seq_len * config.q_size
    return (6 if method == "full" else 4) * n + attention


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build(config: ModelConfig, method: str, optimizer: str, device):
    """A bf16 model with random weights built on `device`, prepared for `method`, its optimizer."""
    with _default_dtype(torch.bfloat16), torch.device(device):
        model = Llama(config)
    if method == "qlora":
        quantize_model(model)
    if method in ("lora", "qlora"):
        lora_wrap(model, r=LORA_R, alpha=2 * LORA_R)
    model.gradient_checkpointing = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = AdamW8bit(params, lr=1e-5) if optimizer == "adamw8bit" else torch.optim.AdamW(params, lr=1e-5)
    return model, params, opt


def measure_step(ctx, step, tokens: int, flops_per_token: float) -> dict:
    """Time `step` after one warm-up step; peak memory of the timed steps; tokens/s and MFU."""
    step()  # creates the optimizer states: the timed steps are the steady state
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(ctx.device)
        torch.cuda.reset_peak_memory_stats(ctx.device)
    ms = ctx.clock.times_ms(step, ctx.seconds, warmup=0)
    median_s = statistics.median(ms) / 1e3
    out = {"ms": ms, "tokens_per_s": tokens / median_s,
           "mfu": tokens * flops_per_token / median_s / ctx.peak_flops if ctx.peak_flops else None}
    out["peak_allocated"] = torch.cuda.max_memory_allocated(ctx.device) if cuda else None
    out["peak_reserved"] = torch.cuda.max_memory_reserved(ctx.device) if cuda else None
    return out


def _batch(config: ModelConfig, sizes, device) -> dict:
    ids = torch.randint(0, config.vocab_size, (sizes.batch, sizes.seq_len), device=device)
    return {"input_ids": ids, "labels": ids.clone()}  # unpadded: every token is trained


def part_train_steps(ctx) -> dict:
    """One minift training step per method on the preset, beside `estimate_memory`."""
    config, sizes = ModelConfig.from_name(ctx.sizes.preset), ctx.sizes
    tokens = sizes.batch * sizes.seq_len
    out = {"preset": sizes.preset, "batch": sizes.batch, "seq_len": sizes.seq_len,
           "gradient_checkpointing": True, "lora_r": LORA_R}
    budget = ctx.seconds
    for method, optimizer in STEP_METHODS:
        ctx.seconds = budget / len(STEP_METHODS) / 2  # half for building, half for timing
        row = {"optimizer": optimizer}
        try:
            model, params, opt = build(config, method, optimizer, ctx.device)
            batch = _batch(config, sizes, ctx.device)

            def step():
                accumulate_gradients(model, [batch], ctx.device, bf16=True)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            row.update(measure_step(ctx, step, tokens, train_flops_per_token(config, sizes.seq_len, method)))
        except Exception as e:  # noqa: BLE001 - an OOM of one method leaves the others to run
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            model = params = opt = None
            _free(ctx.device)
        row["estimate"] = _estimate(config, method, sizes, optimizer, ctx.device.type, loss_chunk_size=None)
        out[method] = row
    return out


def _estimate(config: ModelConfig, method: str, sizes, optimizer: str, device: str, **train_fields) -> dict:
    """`minift.estimate_memory` of the suite's step: bf16, gradient checkpointing, unpadded rows of
    ``sizes``, LoRA rank `LORA_R`; ``train_fields`` as the step differs from `minift.TrainConfig`."""
    from minift import estimate_memory  # the public API: minift.planning shares bench's floor
    return estimate_memory(config, method, batch_size=sizes.batch, seq_len=sizes.seq_len, r=LORA_R,
                           optimizer=optimizer, gradient_checkpointing=True, attention_mask=False,
                           device=device, **train_fields).as_dict()


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the peer stack ----------------------------------------------------------------------
def _peer_modules():
    """transformers, peft and bitsandbytes (None when absent); the suite's only use of them."""
    mods = {}
    for name in ("transformers", "peft", "bitsandbytes"):
        try:
            mods[name] = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - bitsandbytes raises more than ImportError without CUDA
            mods[name] = None
    return mods


def _peer_model(mods, config: ModelConfig, method: str, device):
    tf, peft, bnb = mods["transformers"], mods["peft"], mods["bitsandbytes"]
    hf = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    with _default_dtype(torch.bfloat16), torch.device(device):
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**hf, attn_implementation="sdpa"))
    if method == "qlora":
        _bnb_4bit(model, bnb, device)
    if method in ("lora", "qlora"):
        lora = peft.LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.0,
                               target_modules="all-linear")
        model = peft.get_peft_model(model, lora)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "full" and bnb is not None:
        return model, params, bnb.optim.AdamW8bit(params, lr=1e-5), "bitsandbytes AdamW8bit"
    return model, params, torch.optim.AdamW(params, lr=1e-5), "torch AdamW"


def _bnb_4bit(model: nn.Module, bnb, device) -> None:
    """Every decoder linear as a bitsandbytes NF4 Linear4bit with double quantization."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or name == "lm_head":
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, blocksize=64,
                                         compress_statistics=True, quant_type="nf4")
            setattr(module, name, q.to(device))  # quantizes on the move


def part_peer_steps(ctx) -> dict:
    """The same step in transformers + peft (+ bitsandbytes for QLoRA and the 8-bit optimizer),
    run by a child process started in a temporary directory: from the repository's root, its
    top-level ``kernels/`` folder would be found by ``import kernels``, the name of a PyPI package
    transformers and bitsandbytes import, and the peers would fail or take another path."""
    args = {"device": str(ctx.device), "sizes": dataclasses.asdict(ctx.sizes), "seconds": ctx.seconds,
            "peak_flops": ctx.peak_flops, "iters": ctx.clock.iters, "warmup": ctx.clock.warmup,
            "dry_run": ctx.dry_run}
    code = "import sys; from minift.bench.gpu_steps import peer_child; peer_child(sys.argv[1], sys.argv[2])"
    limit = 3 * ctx.seconds + 300  # building two 8B models in transformers, imports included
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "peer_steps.json")
        try:
            proc = subprocess.run([sys.executable, "-c", code, json.dumps(args), out], cwd=tmp,
                                  capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return {"error": f"hung: the peer process ran past {limit:.0f} s and was stopped"}
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stdout + proc.stderr)[-1500:]
            return {"error": f"the peer process failed (exit code {proc.returncode}): {tail}"}
        with open(out, encoding="utf-8") as f:
            return json.load(f)


def shadowing_dirs() -> set:
    """The folders on ``sys.path`` through which ``import kernels`` would find minift's own
    top-level ``kernels/`` folder (the repository's root, when run from there)."""
    ours = set()
    spec = importlib.util.find_spec("minift.kernels")
    if spec is not None and spec.origin:
        ours.add(os.path.realpath(os.path.dirname(spec.origin)))
    import minift
    ours.add(os.path.realpath(os.path.join(os.path.dirname(minift.__file__), os.pardir, "kernels")))
    return {os.path.realpath(p or os.curdir) for p in sys.path
            if os.path.realpath(os.path.join(p or os.curdir, "kernels")) in ours}


def peer_child(args_json: str, out_path: str) -> None:
    """The peer part inside its child process: minift is imported first (its kernels included),
    then every folder through which ``import kernels`` would reach minift's own leaves
    ``sys.path``, and the peers are imported and timed."""
    from types import SimpleNamespace

    from minift.bench.gpu import Clock, Sizes
    args = json.loads(args_json)
    dropped = shadowing_dirs()
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) not in dropped]
    spec = importlib.util.find_spec("kernels")
    device = torch.device(args["device"])
    ctx = SimpleNamespace(device=device, sizes=Sizes(**args["sizes"]), seconds=args["seconds"],
                          peak_flops=args["peak_flops"], dry_run=args["dry_run"],
                          clock=Clock(device, args["iters"], args["warmup"]))
    if args["dry_run"]:
        torch.set_num_threads(1)
    out = peer_steps_here(ctx)
    out["process"] = {"cwd": os.getcwd(), "removed_from_sys_path": sorted(dropped),
                      "kernels_module": spec.origin if spec is not None else None}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2, default=str)


def peer_steps_here(ctx) -> dict:
    """The peer steps in this process (see `part_peer_steps`)."""
    mods = _peer_modules()
    if mods["transformers"] is None or mods["peft"] is None:
        return {"skipped": "transformers and peft do not import here"}
    config, sizes = ModelConfig.from_name(ctx.sizes.preset), ctx.sizes
    tokens = sizes.batch * sizes.seq_len
    out = {"versions": {k: getattr(m, "__version__", None) for k, m in mods.items() if m}}
    budget = ctx.seconds
    for method, _ in STEP_METHODS:
        if method == "qlora" and (mods["bitsandbytes"] is None or ctx.device.type != "cuda"):
            out[method] = {"skipped": "bitsandbytes NF4 needs bitsandbytes and CUDA"}
            continue
        ctx.seconds = budget / len(STEP_METHODS) / 2
        row = {}
        try:
            model, params, opt, row["optimizer"] = _peer_model(mods, config, method, ctx.device)
            ids = _batch(config, sizes, ctx.device)["input_ids"]

            def step():
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

            row.update(measure_step(ctx, step, tokens, train_flops_per_token(config, sizes.seq_len, method)))
        except Exception as e:  # noqa: BLE001 - recorded; the other methods still run
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            model = params = opt = None
            _free(ctx.device)
        out[method] = row
    return out
