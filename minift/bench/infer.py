"""``python -m minift bench infer MODEL_DIR``: greedy decoding timed, minift beside transformers.

Every side decodes the same random prompts for exactly ``--new-tokens`` tokens (no end-of-text
stop), one side after the other in each round (minift, transformers, minift, ...), so a load
change on a shared CPU hits all alike. A forward hook on the model stamps the end of every
decoding step: the first stamp is the time to the first token (the prompt's forward), the gaps
between stamps are the per-token latencies. Sides:

* ``minift``: ``minift.generate`` on ``load_model(MODEL_DIR, quantize=--quant)``, adapter unmerged;
* ``minift float32`` (``--quant nf4``): the same folder unquantized, the speed NF4 is held to;
* ``minift nf4 cache`` (``--quant nf4``): the same inside ``minift.nf4.inference.nf4_inference_cache``;
* ``minift merged`` (``--adapter``, float32 base): the adapter folded into full-precision weights (``merge_lora``),
  so the unmerged adapter's cost per token is the ratio of the two;
* ``transformers``: ``generate`` of ``LlamaForCausalLM`` from the same folder (peft for the
  adapter, bitsandbytes' 4-bit NF4 for ``--quant nf4``), only when installed.

Peak memory: CUDA's peak allocated bytes on a GPU; on CPU the process's peak resident set during
the call (Linux' VmHWM, reset before each call), which includes every side loaded in the process.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

from minift.bench.cpu import machine_line
from minift.bench.runinfo import git_commit, git_modified, machine_info, portable_paths
from minift.files import write_json
from minift.lora.adapter import load_adapter
from minift.lora.layer import merge_lora
from minift.models.generation import generate
from minift.models.loading import load_model
from minift.nf4.inference import nf4_inference_cache


def _infer_actions() -> list:
    parser = argparse.ArgumentParser(add_help=False)
    add_infer_arguments(parser)
    return parser._actions


def infer_settings(args) -> dict:
    """The values of `bench infer`'s own arguments (not the parent `bench` command's)."""
    return {a.dest: getattr(args, a.dest) for a in _infer_actions() if hasattr(args, a.dest)}


def infer_command(settings: dict) -> str:
    """The command line that reproduces these settings (options at their defaults left out)."""
    words = ["python", "-m", "minift", "bench", "infer"]
    for a in _infer_actions():
        value = settings.get(a.dest, a.default)
        if not a.option_strings:
            words.append(str(value))
        elif value != a.default:
            words += [a.option_strings[0]] if value is True else [a.option_strings[0], str(value)]
    return " ".join(words)


def add_infer_arguments(parser) -> None:
    """The options of ``minift bench infer``."""
    parser.add_argument("model_dir", help="Hugging Face Llama folder (config.json, safetensors)")
    parser.add_argument("--adapter", default=None, help="PEFT LoRA adapter folder applied on top")
    parser.add_argument("--quant", default="none", choices=("none", "nf4"), help="weights of the base")
    parser.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="tokens per random prompt")
    parser.add_argument("--rounds", type=int, default=3, help="timed generations per side and batch")
    parser.add_argument("--price-per-hour", type=float, default=None, help="machine price, USD an hour")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-peer", action="store_true", help="skip the transformers side")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/benchmarks/infer.json", help="JSON result file")


def run_infer(args, parser) -> int:
    """Run ``minift bench infer``; bad input goes through ``parser.error`` (exit 2)."""
    try:
        batches = [int(b) for b in args.batch.split(",") if b]
    except ValueError:
        parser.error(f"--batch: expected comma-separated integers, got {args.batch!r}")
    for name, value in (("batch", min(batches, default=0)), ("new-tokens", args.new_tokens),
                        ("prompt-tokens", args.prompt_tokens), ("rounds", args.rounds)):
        if value <= 0:
            parser.error(f"--{name} must be a positive integer, got {value}")
    if args.price_per_hour is not None and not args.price_per_hour >= 0:
        parser.error(f"--price-per-hour must be >= 0, got {args.price_per_hour}")
    for name, path in (("MODEL_DIR", args.model_dir), ("--adapter", args.adapter)):
        if path is not None and not os.path.isdir(path):
            parser.error(f"{name}: {path} is not a folder")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    sides, notes = build_sides(args)
    vocab = sides["minift"][0].config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    results = {}
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, args.prompt_tokens), generator=gen).to(args.device)
        print(f"minift bench infer: batch {batch} ...", file=sys.stderr, flush=True)
        results[f"batch_{batch}"] = time_sides(sides, ids, args)
    settings = infer_settings(args)
    record = {"command": infer_command(settings),
              "machine": machine_info(), "device": args.device, "torch_threads": torch.get_num_threads(),
              "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
              "git_commit": git_commit(), "git_modified": git_modified(),
              "settings": settings,
              "memory_measure": "cuda max_memory_allocated" if args.device.startswith("cuda")
              else "process peak RSS (VmHWM) during the call, every loaded side included",
              "sides": {name: {"weight_bytes": weight_bytes(model)} | notes.get(name, {})
                        for name, (model, _) in sides.items()},
              "notes": notes.get("", {}), "results": results}
    record = portable_paths(record)
    write_json(args.out, record)
    print(results_markdown(record))
    return 0


# ---- the sides -------------------------------------------------------------------------------
def build_sides(args) -> tuple[dict, dict]:
    """{name: (model, generate(ids) -> ids)} and {name: notes}; the "" note is about the run."""
    quant = None if args.quant == "none" else args.quant
    sides, notes = {}, {"": {}}
    model = _minift_model(args, quant)
    sides["minift"] = (model, _minift_generate(model, args.new_tokens))
    if quant == "nf4":
        full = _minift_model(args, None)
        sides["minift float32"] = (full, _minift_generate(full, args.new_tokens))
        cached = _minift_model(args, quant)
        cache = contextlib.ExitStack()
        report = cache.enter_context(nf4_inference_cache(cached))
        sides["minift nf4 cache"] = (cached, _minift_generate(cached, args.new_tokens))
        cached._minift_bench_cache = cache  # the cache lives as long as the model
        notes["minift nf4 cache"] = {"cache": report}
    if args.adapter and quant is None:  # an NF4 base merges into bf16 weights: another model
        merged = merge_lora(_minift_model(args, quant))
        sides["minift merged"] = (merged, _minift_generate(merged, args.new_tokens))
        notes["minift merged"] = {"what": "adapter merged into full-precision weights (merge_lora)"}
    if args.no_peer:
        notes[""]["transformers"] = "skipped (--no-peer)"
    else:
        try:
            peer = _peer_model(args, quant)
            sides["transformers"] = (peer, _peer_generate(peer, args.new_tokens))
        except Exception as err:  # a peer that cannot load or run here is reported, not fatal
            notes[""]["transformers"] = f"not run: {type(err).__name__}: {str(err).splitlines()[0][:300]}"
    return sides, notes


def _minift_model(args, quant):
    model = load_model(args.model_dir, dtype=torch.float32, device=args.device, quantize=quant)
    if args.adapter:
        load_adapter(model, args.adapter)
    return model.eval()


def _minift_generate(model, new_tokens: int):
    # no end-of-text ids: every row decodes exactly new_tokens tokens
    return lambda ids: generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[])


def _peer_model(args, quant):
    import transformers

    transformers.utils.logging.disable_progress_bar()
    kwargs = {"dtype": torch.float32, "device_map": args.device}
    if quant == "nf4":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.LlamaForCausalLM.from_pretrained(args.model_dir, **kwargs)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    return model.eval()


def _peer_generate(model, new_tokens: int):
    # no end-of-text id, as on minift's side: every row decodes new_tokens tokens. (min_new_tokens
    # would instead forbid the end-of-text token, and the greedy tokens would part at its first argmax.)
    model.generation_config.eos_token_id = None

    def run(ids):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=new_tokens, pad_token_id=0)
    return run


def _inner(model):
    """The module whose forward runs once per decoding step (under a PEFT wrapper: the base)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def weight_bytes(model) -> int:
    """Bytes of the parameters and buffers (shared storages once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t.untyped_storage()) not in seen:
            seen.add(id(t.untyped_storage()))
            total += t.untyped_storage().nbytes()
    return total


# ---- timing ----------------------------------------------------------------------------------
def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def _peak(device: str):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return None


def timed_generate(model, run, ids, device: str) -> dict:
    """One generation: its start, the end of every forward (one per new token), its end, peak memory."""
    stamps = []

    def stamp(*_):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    handle = _inner(model).register_forward_hook(stamp)
    _reset_peak(device)
    before = _peak(device)
    try:
        start = time.perf_counter()
        out = run(ids)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        end = time.perf_counter()
    finally:
        handle.remove()
    peak = _peak(device)
    return {"start": start, "stamps": stamps, "end": end, "peak": peak, "out": out,
            "peak_increase": None if peak is None else peak - before}


def percentile(values: list, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_sides(sides: dict, ids: torch.Tensor, args) -> dict:
    """Every side once untimed, then ``args.rounds`` rounds of one timed generation per side."""
    runs = {name: [] for name in sides}
    outputs = {}
    for name, (model, run) in sides.items():
        outputs[name] = run(ids)[:, ids.shape[1]:].cpu()  # warm-up, and the tokens for the check
    for _ in range(args.rounds):
        for name, (model, run) in sides.items():
            runs[name].append(timed_generate(model, run, ids, args.device))
    batch, new = ids.shape[0], args.new_tokens
    out = {name: summarize(r, batch, new, args.price_per_hour) for name, r in runs.items()}
    for name in out:
        out[name]["same_tokens_as_minift"] = bool(torch.equal(outputs[name], outputs["minift"]))
    base = out["minift"]["token_latency_s"]["p50"]
    for name in out:
        out[name]["p50_ratio_vs_minift"] = out[name]["token_latency_s"]["p50"] / base
    return out


def summarize(runs: list, batch: int, new_tokens: int, price_per_hour) -> dict:
    """Time to first token, per-token latencies, tokens/s and cost of a side's timed runs."""
    ttft = [r["stamps"][0] - r["start"] for r in runs]
    gaps = [b - a for r in runs for a, b in zip(r["stamps"], r["stamps"][1:])]
    total = sum(r["end"] - r["start"] for r in runs)
    tokens = batch * new_tokens * len(runs)
    per_s = tokens / total
    peaks = [r["peak"] for r in runs if r["peak"] is not None]
    return {"runs": len(runs), "forwards_per_run": [len(r["stamps"]) for r in runs],
            "ttft_s": {"median": statistics.median(ttft), "min": min(ttft), "max": max(ttft)},
            "token_latency_s": {"p50": percentile(gaps, 50), "p99": percentile(gaps, 99),
                                "mean": statistics.fmean(gaps), "n": len(gaps)} if gaps else None,
            "tokens": tokens, "time_s": total, "tokens_per_s": per_s,
            "peak_memory_bytes": max(peaks) if peaks else None,
            "peak_memory_increase_bytes": max(r["peak_increase"] for r in runs) if peaks else None,
            "cost_per_1m_tokens_usd": None if price_per_hour is None else price_per_hour / 3600 / per_s * 1e6}


# ---- report ----------------------------------------------------------------------------------
def results_markdown(record: dict) -> str:
    """One row per batch and side: TTFT, P50 / P99 per token, tokens/s, peak memory, ratio."""
    rows = ["| batch | side | TTFT ms | per token P50 ms | P99 ms | tokens/s | peak MiB | P50 / minift |",
            "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for key, sides in record["results"].items():
        for name, r in sides.items():
            lat = r["token_latency_s"] or {"p50": float("nan"), "p99": float("nan")}
            peak = r["peak_memory_bytes"]
            rows.append(f"| {key.removeprefix('batch_')} | {name} | {r['ttft_s']['median'] * 1e3:.1f} | "
                        f"{lat['p50'] * 1e3:.2f} | {lat['p99'] * 1e3:.2f} | {r['tokens_per_s']:.1f} | "
                        f"{'-' if peak is None else f'{peak / 2**20:.0f}'} | {r['p50_ratio_vs_minift']:.2f} |")
    notes = [f"{k}: {v}" for k, v in record["notes"].items()]
    return "\n".join(rows + [""] + notes + [machine_line(record["machine"], record.get("torch_threads"))])
