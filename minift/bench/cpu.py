"""``python -m minift bench cpu``: minift's CPU paths timed against the ecosystem's, in one run.

Three sections, each timed in interleaved rounds (minift, then the peer, then minift again ...)
so that a load change on a shared CPU hits both sides alike:

* ``optim``: one 8-bit AdamW step over the parameters of a small Llama (minift.AdamW8bit vs
  bitsandbytes' AdamW8bit on CPU, and torch's AdamW as the float32 baseline);
* ``nf4``: dequantizing every linear weight of that model (minift vs bitsandbytes);
* ``train``: one full / LoRA / QLoRA training step (forward, loss, backward, optimizer) of the
  same weights on the same batch, minift vs transformers + peft (+ bitsandbytes).

The peers are imported here, inside functions, only when installed; minift never needs them.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

from minift.bench.runinfo import git_commit, git_modified, machine_info
from minift.files import write_json
from minift.lora.layer import lora_wrap
from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.models.loading import load_model, save_model
from minift.nf4.quantize import _dequantize_reference, dequantize_nf4, quantize_nf4
from minift.objectives.loss import token_loss_sum
from minift.optim.adamw8bit import AdamW8bit

SECTIONS = ("optim", "nf4", "train")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_cpu_arguments(parser) -> None:
    """The options of ``minift bench cpu``."""
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the Llama")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1408, help="MLP size (a multiple of 64)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side (median)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights and compute dtype")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/benchmarks/bench_cpu_peers.json", help="JSON path")


def run_cpu(args, parser) -> int:
    """Run ``minift bench cpu``; bad input goes through ``parser.error`` (exit 2)."""
    for name in ("hidden", "layers", "intermediate", "heads", "vocab", "batch", "seq", "rounds", "r"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.hidden % args.heads:
        parser.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    for name in ("hidden", "intermediate"):  # bitsandbytes' CPU dequantizer needs whole blocks per row
        if getattr(args, name) % 64:
            parser.error(f"--{name} must be a multiple of 64, got {getattr(args, name)}")
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        parser.error(f"--sections: unknown {bad or sections!r}; choose from {','.join(SECTIONS)}")
    if args.threads is not None:
        if args.threads <= 0:
            parser.error(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    load_before = os.getloadavg()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _write_checkpoint(args, tmp)
        for name, run in (("optim", bench_optim), ("nf4", bench_nf4), ("train", bench_train)):
            if name in sections:
                print(f"minift bench cpu: {name} ...", file=sys.stderr, flush=True)
                results[name] = run(checkpoint, args, dtype)
    record = {"command": "python -m minift " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
              "machine": machine_info(), "torch_threads": torch.get_num_threads(),
              "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
              "git_commit": git_commit(), "git_modified": git_modified(),
              "settings": vars(args) | {"dtype": args.dtype}, "peers": peer_versions(),
              "cpu_dispatch": cpu_dispatch(),
              "results": results}
    write_json(args.out, record)
    print(results_markdown(record))
    return 0


# ---- timing --------------------------------------------------------------------------------
def interleaved(fns: dict, rounds: int) -> dict:
    """Time each callable once per round, in turn (one untimed warm-up each first).

    Returns {name: {"median_s", "min_s", "max_s", "spread", "times_s"}}; spread is
    (max - min) / median, the run-to-run variation on this machine.
    """
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: summarize(ts) for name, ts in times.items()}


def summarize(ts: list) -> dict:
    med = statistics.median(ts)
    return {"median_s": med, "min_s": min(ts), "max_s": max(ts),
            "spread": (max(ts) - min(ts)) / med if med > 0 else 0.0, "times_s": ts}


def _ratio(timings: dict, mine: str, peer: str):
    if peer not in timings:
        return None
    return timings[mine]["median_s"] / timings[peer]["median_s"]


def peer_versions() -> dict:
    """Installed versions of the peers (None where absent)."""
    out = {}
    for name in ("bitsandbytes", "transformers", "peft"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "unknown")
        except ImportError:
            out[name] = None
    return out


def cpu_dispatch() -> dict:
    """Which vector code each side ran: torch's kernels follow ``ATEN_CPU_CAPABILITY`` (so one
    AVX-512 CPU can run its AVX2 or scalar kernels), bitsandbytes' native CPU library does not:
    it reads the CPU's AVX-512F bit itself (its NF4 dequantizer has an AVX-512 loop and a scalar
    one, no AVX2 one; its 8-bit blockwise (de)quantizers use no AVX-512). Its optimizer
    arithmetic is torch ops, which do follow the variable."""
    out = {name: os.environ.get(name) for name in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
    out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        from bitsandbytes.cextension import lib

        out["bitsandbytes_native_avx512f"] = bool(lib.has_avx512f_cpu())
    except (ImportError, AttributeError, OSError, RuntimeError):
        out["bitsandbytes_native_avx512f"] = None
    return out


def _have(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


# ---- the shared model ------------------------------------------------------------------------
def _write_checkpoint(args, directory: str) -> str:
    """A randomly initialised Llama in Hugging Face format (safetensors): both sides load it."""
    config = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=max(args.seq, 64), torch_dtype="float32",
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(args.seed)
    model = Llama(config)
    save_model(model, directory)
    return directory


# ---- sections --------------------------------------------------------------------------------
def bench_optim(checkpoint: str, args, dtype=None) -> dict:
    """One optimizer step over every parameter of the model (float32 copies, same gradients;
    ``dtype`` is not used: optimizers step float32 parameters here, as in mixed precision)."""
    model = load_model(checkpoint, dtype=torch.float32)
    shapes = [p.shape for p in model.parameters()]
    del model
    gen = torch.Generator().manual_seed(args.seed)
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]

    def params():
        out = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p, g in zip(out, grads):
            p.grad = g
        return out

    opts = {"minift AdamW8bit": AdamW8bit(params(), lr=1e-3),
            "torch AdamW (fp32 states)": torch.optim.AdamW(params(), lr=1e-3)}
    if _have("bitsandbytes"):
        import bitsandbytes as bnb

        opts["bitsandbytes AdamW8bit"] = bnb.optim.AdamW8bit(params(), lr=1e-3)
    timings = interleaved({name: opt.step for name, opt in opts.items()}, args.rounds)
    return {"parameters": sum(s.numel() for s in shapes), "tensors": len(shapes),
            "timings": timings,
            "ratio_vs_bitsandbytes": _ratio(timings, "minift AdamW8bit", "bitsandbytes AdamW8bit"),
            "ratio_vs_torch_adamw": _ratio(timings, "minift AdamW8bit", "torch AdamW (fp32 states)")}


def bench_nf4(checkpoint: str, args, dtype) -> dict:
    """Dequantize every linear weight (blocksize 64, double quantization) to ``dtype``."""
    model = load_model(checkpoint, dtype=dtype)
    weights = [m.weight.detach() for name, m in model.named_modules() if name.endswith(LINEARS)]
    del model
    ours = [quantize_nf4(w, 64, True) for w in weights]
    fns = {"minift dequantize_nf4": lambda: [dequantize_nf4(q, dtype) for q in ours],
           # the pure-torch reference the CPU used before (kept as the tests' oracle)
           "minift reference": lambda: [_dequantize_reference(q, dtype) for q in ours]}
    same = None
    if _have("bitsandbytes"):
        import bitsandbytes.functional as bf

        theirs = [bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                  for w in weights]
        fns["bitsandbytes dequantize_4bit"] = lambda: [bf.dequantize_4bit(p, s, quant_type="nf4")
                                                       for p, s in theirs]
        # the same numbers: both sides dequantize equal bytes to equal values
        same = all(torch.equal(dequantize_nf4(q, dtype), bf.dequantize_4bit(p, s, quant_type="nf4"))
                   for q, (p, s) in zip(ours, theirs))
    timings = interleaved(fns, args.rounds)
    return {"weights": len(weights), "elements": sum(w.numel() for w in weights),
            "shapes": sorted({tuple(w.shape) for w in weights}), "dtype": args.dtype,
            "bit_identical_outputs": same, "timings": timings,
            "ratio_vs_bitsandbytes": _ratio(timings, "minift dequantize_nf4",
                                            "bitsandbytes dequantize_4bit"),
            "speedup_vs_reference": 1 / _ratio(timings, "minift dequantize_nf4", "minift reference")}


def bench_train(checkpoint: str, args, dtype) -> dict:
    """One training step per method, minift and the peer interleaved, method by method."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    peers = _have("transformers") and _have("peft")
    out = {"batch": [args.batch, args.seq], "dtype": args.dtype}
    for method in ("full", "lora", "qlora"):
        sides = {"minift": _minift_step(checkpoint, method, ids, args, dtype)}
        if peers and (method != "qlora" or _have("bitsandbytes")):
            sides["transformers+peft"] = _peer_step(checkpoint, method, ids, args, dtype)
        first_loss = {name: side() for name, side in sides.items()}  # also the warm-up
        timings = interleaved(sides, args.rounds)
        out[method] = {"optimizer": "8-bit AdamW" if method == "full" else "torch AdamW",
                       "first_loss": first_loss, "timings": timings,
                       "ratio_vs_peer": _ratio(timings, "minift", "transformers+peft")}
        del sides
    return out


def _minift_step(checkpoint, method, ids, args, dtype):
    model = load_model(checkpoint, dtype=dtype, quantize="nf4" if method == "qlora" else None)
    if method == "full":
        opt = AdamW8bit(model.parameters(), lr=1e-5)
    else:
        lora_wrap(model, r=args.r, alpha=2 * args.r)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    n_tokens = ids[:, 1:].numel()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = token_loss_sum(model(ids), ids) / n_tokens
        loss.backward()
        opt.step()
        return loss.item()
    return step


def _peer_step(checkpoint, method, ids, args, dtype):
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.utils.logging.disable_progress_bar()
    kwargs = {"dtype": dtype, "device_map": "cpu"}
    if method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = transformers.LlamaForCausalLM.from_pretrained(checkpoint, **kwargs)
    if method == "full":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-5)
    else:
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                                 target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss  # mean over the shifted tokens
        loss.backward()
        opt.step()
        return loss.item()
    return step


# ---- report ----------------------------------------------------------------------------------
def _cell(t: dict) -> str:
    return f"{t['median_s']:.4f} ({t['min_s']:.4f}–{t['max_s']:.4f})"


def results_markdown(record: dict) -> str:
    """One table: each timing's median (min–max) in seconds and the ratio minift / peer."""
    rows = ["| what | minift s, median (min–max) | peer | peer s, median (min–max) | "
            "minift / peer |", "|---|---:|---|---:|---:|"]
    res = record["results"]
    if "optim" in res:
        t = res["optim"]["timings"]
        for peer in ("bitsandbytes AdamW8bit", "torch AdamW (fp32 states)"):
            if peer in t:
                rows.append(f"| 8-bit AdamW step, {res['optim']['parameters'] / 1e6:.1f}M params | "
                            f"{_cell(t['minift AdamW8bit'])} | {peer} | {_cell(t[peer])} | "
                            f"{_ratio(t, 'minift AdamW8bit', peer):.2f} |")
    if "nf4" in res and "bitsandbytes dequantize_4bit" in res["nf4"]["timings"]:
        t = res["nf4"]["timings"]
        rows.append(f"| NF4 dequant, {res['nf4']['weights']} weights ({res['nf4']['dtype']}) | "
                    f"{_cell(t['minift dequantize_nf4'])} | bitsandbytes | "
                    f"{_cell(t['bitsandbytes dequantize_4bit'])} | "
                    f"{res['nf4']['ratio_vs_bitsandbytes']:.2f} |")
    for method in ("full", "lora", "qlora"):
        entry = res.get("train", {}).get(method)
        if entry and "transformers+peft" in entry["timings"]:
            t = entry["timings"]
            rows.append(f"| {method} step ({entry['optimizer']}), batch "
                        f"{res['train']['batch'][0]}×{res['train']['batch'][1]} | "
                        f"{_cell(t['minift'])} | transformers+peft | "
                        f"{_cell(t['transformers+peft'])} | {entry['ratio_vs_peer']:.2f} |")
    lines = ["", machine_line(record["machine"], record.get("torch_threads"))]
    dispatch = record.get("cpu_dispatch") or {}
    if dispatch.get("ATEN_CPU_CAPABILITY"):
        lines.append(f"ATEN_CPU_CAPABILITY={dispatch['ATEN_CPU_CAPABILITY']}; bitsandbytes' native "
                     f"library AVX-512F: {dispatch.get('bitsandbytes_native_avx512f')}")
    return "\n".join(rows + lines)


def machine_line(machine: dict, threads=None) -> str:
    """The CPU under the figures: the same code measures 3x apart on an AVX2 and an AVX-512 CPU,
    so a figure without its CPU model and vector extensions says little."""
    flags = ", ".join(machine.get("cpu_vector_flags", [])) or "no AVX flags read"
    capability = machine.get("torch_cpu_capability")
    return (f"CPU: {machine.get('cpu_model') or 'unknown'}"
            f"{f'; torch kernels {capability}' if capability else ''}; vector flags: {flags}"
            f"{f'; {threads} thread(s)' if threads else ''}")
