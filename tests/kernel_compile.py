"""Compile every Triton kernel of minift.kernels ahead of time for sm_80 and sm_90, on any machine.

Each case runs a launcher exactly as minift calls it, on meta tensors of realistic shapes (up to
an 8192 x 28672 weight), with the kernel swapped for a recorder; the recorded arguments go
through Triton's own launch-time specialisation (argument types, 16-byte alignment, constexprs)
and then ``triton.compile`` for a ``GPUTarget``, whose bundled ptxas needs no GPU. ptxas -v on the
PTX gives registers, spills and shared memory; the PTX itself gives the width of every global load
and store (``ld.global.v4.b32``: 16 bytes per thread in one instruction) and the bf16 conversions.
From registers, warps and shared memory each record also derives how many programs fit on one
multiprocessor (the occupancy a launch of enough programs reaches).

Run as a script (Triton's interpreter must be off, so tests call it in a subprocess):
    python tests/kernel_compile.py [--json PATH]    # prints one JSON record per compiled kernel
"""
import argparse
import json
import os
import re
import subprocess
import sys

ARCHS = (80, 90)
WARP_SIZE = 32
# per multiprocessor, sm_80 (A100) and sm_90 (H100/H200): registers, resident warps and programs,
# shared memory a program may use (the driver keeps 1 KiB per program besides), multiprocessors
SM_LIMITS = {80: dict(registers=65536, warps=64, programs=32, smem=167936, sms=108),
             90: dict(registers=65536, warps=64, programs=32, smem=233472, sms=132)}
BIG = (8192, 28672)  # the largest Llama-family linear we meet (Llama-3.1-70B up/gate)


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` only records the call."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def record(module, name, launch):
    """The launches ``launch()`` makes of ``module.<name>``: list of (kernel, grid, args, kwargs)."""
    kernel = getattr(module, name)
    rec = _Recorder(kernel)
    setattr(module, name, rec)
    try:
        launch()
    finally:
        setattr(module, name, kernel)
    return [(kernel, grid, args, kwargs) for grid, args, kwargs in rec.calls]


def compile_launch(kernel, args, kwargs, arch):
    """triton.compile of one recorded launch for sm_<arch>, specialised as a real launch would be."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, WARP_SIZE)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization,
                                                              options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    return compiled, signature, options


_USAGE = {}


def ptxas_usage(ptx: str, arch: int, fp_fusion: bool) -> dict:
    """Registers, spill bytes and static shared memory from Triton's bundled ptxas -v."""
    key = (ptx, arch, fp_fusion)  # shapes that specialise alike give the same PTX: ask once
    if key not in _USAGE:
        _USAGE[key] = _ptxas_usage(ptx, arch, fp_fusion)
    return _USAGE[key]


def _ptxas_usage(ptx: str, arch: int, fp_fusion: bool) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    path = f"/tmp/minift_kc_{os.getpid()}_{arch}.ptx"
    with open(path, "w") as f:
        f.write(ptx)
    cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
           path, "-o", path + ".o"] + ([] if fp_fusion else ["--fmad=false"])
    log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    for p in (path, path + ".o"):
        os.remove(p)

    def num(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "smem_static": num(r"(\d+) bytes smem")}


def _meta(*shape, dtype=None):
    import torch

    return torch.empty(shape, dtype=dtype or torch.float32, device="meta")


def _adamw_cases():
    import minift.kernels.adamw8bit as mod
    import torch

    from minift.optim.quant8 import StepScalars
    from minift.quantmaps import dynamic_map

    s = StepScalars.make(1e-4, 0.9, 0.999, 1e-8, 0.01, step=10, seed=123)
    maps = (dynamic_map(True, "meta"), dynamic_map(False, "meta"))

    def launch(n, dtype, stochastic):
        p, g = _meta(n, dtype=dtype), _meta(n, dtype=dtype)
        st = (_meta(n, dtype=torch.uint8), _meta(-(-n // 256)), _meta(n, dtype=torch.uint8), _meta(-(-n // 256)))
        return lambda: mod.adamw8bit_step(p, g, *st, *maps, s, 0, stochastic)

    n_big = BIG[0] * BIG[1]
    for dtype, stochastic in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
                              (torch.float16, False)):
        label = f"{n_big} {str(dtype)[6:]}" + (" stochastic" if stochastic else "")
        yield "adamw8bit", label, mod, "_adamw8bit_kernel", launch(n_big, dtype, stochastic)
    # past 2**31 elements the element count is passed (and specialised) as a 64-bit integer
    yield "adamw8bit", f"{2**31 + 256} bf16", mod, "_adamw8bit_kernel", launch(2**31 + 256, torch.bfloat16, False)

    def launch_many(shapes, dtype, stochastic):
        slices = []
        for rows, cols in shapes:
            n = rows * cols
            p, g = _meta(n, dtype=dtype), _meta(n, dtype=dtype)
            st = (_meta(n, dtype=torch.uint8), _meta(-(-n // 256)), _meta(n, dtype=torch.uint8), _meta(-(-n // 256)))
            slices.append((p, g, *st, s, 0, stochastic))
        return lambda: mod.adamw8bit_step_many(slices, *maps)

    # the multi-tensor launch of a LoRA step: r=16 on every linear of Llama-3.1-8B, A and B of
    # q, k, v, o, gate, up, down in 32 layers = 448 slices; every element count a multiple of 16
    h, kv, inter, r = 4096, 1024, 14336, 16
    lora = [(r, h), (h, r), (r, h), (kv, r), (r, h), (kv, r), (r, h), (h, r), (r, h), (inter, r), (r, h),
            (inter, r), (r, inter), (h, r)] * 32
    for dtype, stochastic in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        label = f"{len(lora)} LoRA r=16 slices of Llama-3.1-8B {str(dtype)[6:]}" + (" stochastic" if stochastic else "")
        yield "adamw8bit_multi", label, mod, "_adamw8bit_multi_kernel", launch_many(lora, dtype, stochastic)
    # element counts that are not a multiple of 16: no 16-byte loads (ALIGNED off)
    yield "adamw8bit_multi", "2 slices of 4097 float32 (unaligned)", mod, "_adamw8bit_multi_kernel", \
        launch_many([(17, 241), (4097, 1)], torch.float32, False)


def _nf4_cases():
    import minift.kernels.nf4 as mod
    import torch

    def launch(shape, dtype, blocksize, dq):
        n = shape[0] * shape[1]
        packed, code = _meta((n + 1) // 2, dtype=torch.uint8), _meta(16)
        blocks = -(-n // blocksize)
        if not dq:
            return lambda: mod.nf4_dequantize(packed, _meta(blocks), code, shape, blocksize, dtype)
        return lambda: mod.nf4_dequantize(packed, _meta(blocks, dtype=torch.uint8), code, shape, blocksize, dtype,
                                          nested_absmax=_meta(-(-blocks // 256)), nested_code=_meta(256),
                                          offset=0.0)

    for shape in ((4096, 4096), (4096, 14336), BIG):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            label = f"{shape[0]}x{shape[1]} {str(dtype)[6:]} blocksize 64 double-quant"
            yield "nf4_dequant", label, mod, "_nf4_dequant_kernel", launch(shape, dtype, 64, True)
    # one scale per program (blocksize >= the program's 1024 elements), no double quantization
    yield "nf4_dequant", f"{BIG[0]}x{BIG[1]} bfloat16 blocksize 4096", mod, "_nf4_dequant_kernel", \
        launch(BIG, torch.bfloat16, 4096, False)


def _nf4_gemv_cases():
    import minift.kernels.nf4_gemv as mod
    import torch

    def launch(m, shape, dtype):
        n, k = shape
        blocks = n * k // 64
        x, packed = _meta(m, k, dtype=dtype), _meta(n * k // 2, dtype=torch.uint8)
        return lambda: mod.nf4_gemv(x, packed, _meta(blocks, dtype=torch.uint8), _meta(16), shape, 64,
                                    nested_absmax=_meta(-(-blocks // 256)), nested_code=_meta(256), offset=0.0)

    # decoding at Llama-3.1-8B shapes: q / o (4096 x 4096), k / v (1024 x 4096), gate / up, down
    for shape in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        for m, dtype in ((1, torch.bfloat16), (16, torch.bfloat16), (1, torch.float16), (1, torch.float32),
                         (16, torch.float32)):
            label = f"x {m}x{shape[1]} {str(dtype)[6:]} @ nf4 {shape[0]}x{shape[1]} blocksize 64 double-quant"
            yield "nf4_gemv", label, mod, "_nf4_gemv_kernel", launch(m, shape, dtype)


def _rmsnorm_cases():
    import minift.kernels.rmsnorm as mod
    import torch
    from minift.kernels.rmsnorm_sizes import H100_SMS, backward_programs

    rows = 2 * 2048  # a batch of 2 x 2048 tokens
    # hidden 2048 (Llama-3.2-1B), 4096 (Llama-3.1-8B), 8192 (-70B), 16384 (-405B)
    for hidden, dtype in ((2048, torch.bfloat16), (4096, torch.bfloat16), (4096, torch.float32),
                          (8192, torch.bfloat16), (8192, torch.float32), (16384, torch.bfloat16)):
        x, w = _meta(rows, hidden, dtype=dtype), _meta(hidden, dtype=dtype)
        rstd = _meta(rows)
        label = f"{rows}x{hidden} {str(dtype)[6:]}"
        # the grid a launch on an H100 / H200 (132 multiprocessors) takes
        programs = backward_programs(rows, hidden, x.element_size(), H100_SMS)
        yield "rmsnorm_fwd", label, mod, "_rmsnorm_fwd_kernel", (lambda x=x, w=w: mod.rms_norm_forward(x, w, 1e-5))
        yield "rmsnorm_bwd", label, mod, "_rmsnorm_bwd_kernel", \
            (lambda x=x, w=w, r=rstd, p=programs: mod.rms_norm_backward(x, x, w, r, programs=p))


def _rope_cases():
    import minift.kernels.rope as mod
    import torch

    # Llama-3.1-8B (32 q heads, 8 kv heads) and -70B (64, 8); head_dim 128, batch 2 x 2048,
    # q in the model's layout: (B, T, H, D) viewed as (B, H, T, D)
    for heads in (32, 64):
        q = _meta(2, 2048, heads, 128, dtype=torch.bfloat16).transpose(1, 2)
        k = _meta(2, 8, 2048, 128, dtype=torch.bfloat16)
        cos = _meta(2, 1, 2048, 128, dtype=torch.bfloat16)
        for backward in (False, True):
            label = f"q 2x{heads}x2048x128, k 2x8x2048x128 bfloat16" + (" backward" if backward else "")
            yield "rope", label, mod, "_rope_kernel", \
                (lambda q=q, k=k, c=cos, b=backward: mod.rope(q, k, c, c, backward=b))


def _swiglu_cases():
    import minift.kernels.swiglu as mod
    import torch

    for inter in (14336, 28672):
        g = _meta(2, 2048, inter, dtype=torch.bfloat16)
        label = f"2x2048x{inter} bfloat16"
        yield "swiglu_fwd", label, mod, "_swiglu_fwd_kernel", (lambda g=g: mod.swiglu_forward(g, g))
        yield "swiglu_bwd", label, mod, "_swiglu_bwd_kernel", (lambda g=g: mod.swiglu_backward(g, g, g))


def _cases():
    """(kernel name, case label, module, attribute, launch) for every kernel and config."""
    yield from _adamw_cases()
    yield from _nf4_cases()
    yield from _nf4_gemv_cases()
    yield from _rmsnorm_cases()
    yield from _rope_cases()
    yield from _swiglu_cases()


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)+)")


def global_widths(ptx: str, op: str) -> dict:
    """Counts of the ``op`` ("ld" or "st") ``.global`` instructions in ``ptx`` by width, keyed
    "v4.b32" (four 32-bit registers: 16 bytes per thread), "b16", ...; cache hints are dropped."""
    counts = {}
    for kind, suffix in _GLOBAL_ACCESS.findall(ptx):
        if kind != op:
            continue
        parts = suffix.strip(".").split(".")
        vec = [p for p in parts if re.fullmatch(r"v\d+", p)]
        key = ".".join(vec + [parts[-1]])  # the element type comes last
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def width_bytes(key: str) -> int:
    """Bytes per thread that one instruction of width ``key`` ("v4.b32" -> 16, "b8" -> 1) moves."""
    *vec, elem = key.split(".")
    return (int(vec[0][1:]) if vec else 1) * int(re.search(r"\d+", elem).group()) // 8


def programs_per_sm(arch: int, num_warps: int, registers: int, smem: int) -> int:
    """Programs of ``num_warps`` warps that fit on one multiprocessor at once, as CUDA's occupancy
    calculator counts: registers are allocated per warp in units of 256 (8 per thread), from four
    quarters of the register file, one per warp scheduler."""
    lim = SM_LIMITS[arch]
    per_warp = -(-registers * WARP_SIZE // 256) * 256
    warps_by_regs = 4 * ((lim["registers"] // 4) // per_warp)
    by_smem = lim["smem"] // (smem + 1024) if smem else lim["programs"]
    return min(warps_by_regs // num_warps, lim["warps"] // num_warps, lim["programs"], by_smem)


def _record(kname, label, entry, launch_index, grid, arch, compiled, signature, options, consts):
    """What the docs and tests read about one compiled launch."""
    ptx = compiled.asm["ptx"]
    rec = {"kernel": kname, "entry": entry, "case": label, "launch": launch_index,
           "arch": f"sm_{arch}", "grid": list(grid), "num_warps": options.num_warps,
           "constexprs": consts,
           "fp_fusion": options.enable_fp_fusion, "shared_dynamic": compiled.metadata.shared,
           "int_args": {k: v for k, v in signature.items() if v in ("i32", "i64")},
           "fma_f32": len(re.findall(r"\bfma\.rn\.f32\b", ptx)),
           "ld_global_u8": len(re.findall(r"ld\.global(?:\.[\w:]+)*\.[bu]8\b", ptx)),
           "ld_global": len(re.findall(r"\bld\.global\b", ptx)),
           "ld_global_widths": global_widths(ptx, "ld"), "st_global_widths": global_widths(ptx, "st"),
           # float32 -> bf16: the hardware conversion, one value or two packed per instruction, and
           # the integer rounding of common.round_to_bf16 (its "+ 0x7FFF" on the bits)
           "cvt_bf16_f32": len(re.findall(r"\bcvt\.rn\.bf16\.f32\b", ptx)),
           "cvt_bf16x2_f32": len(re.findall(r"\bcvt\.rn\.bf16x2\.f32\b", ptx)),
           "add_0x7fff": len(re.findall(r"\badd\.[su]32\s+%r\d+,\s*%r\d+,\s*32767;", ptx))}
    rec.update(ptxas_usage(ptx, arch, options.enable_fp_fusion))
    fit = programs_per_sm(arch, options.num_warps, rec["registers"], compiled.metadata.shared)
    n_programs = 1
    for g in grid:
        n_programs *= g
    # the launch's own grid may hold fewer programs than fit (a persistent grid of ~2 per SM)
    resident = min(fit, -(-n_programs // SM_LIMITS[arch]["sms"]))
    rec.update(programs_per_sm=fit, occupancy=fit * options.num_warps / SM_LIMITS[arch]["warps"],
               occupancy_of_grid=resident * options.num_warps / SM_LIMITS[arch]["warps"])
    return rec


def run(archs=ARCHS, kernels=None):
    """One record per (case, launch, architecture); ``kernels``: only these kernel names."""
    records = []
    for kname, label, module, attr, launch in _cases():
        if kernels and kname not in kernels:
            continue
        entry = f"{module.__name__.split('.')[-1]}.{attr}"  # e.g. "nf4._nf4_dequant_kernel"
        for i, (kernel, grid, args, kwargs) in enumerate(record(module, attr, launch)):
            consts = {p.name: kwargs[p.name] for p in kernel.params
                      if p.is_constexpr and isinstance(kwargs.get(p.name), (bool, int, float, str))}
            for arch in archs:
                compiled, signature, options = compile_launch(kernel, args, kwargs, arch)
                records.append(_record(kname, label, entry, i, grid, arch, compiled, signature,
                                       options, consts))
    return records


def _report(records, argv):
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    from minift.bench.runinfo import git_commit, machine_info

    return {"what": "ahead-of-time compile of minift.kernels for sm_80 / sm_90 (no GPU involved)",
            "command": " ".join(["python", "tests/kernel_compile.py"] + list(argv if argv is not None else sys.argv[1:])),
            "machine": machine_info(), "torch": torch.__version__, "triton": triton.__version__,
            "ptxas": get_ptxas(90).version.strip().splitlines()[-1], "commit": git_commit(),
            "kernels": all_kernels(), "records": records}


def all_kernels():
    """Names of the entry kernels (``*_kernel`` JIT functions) in every module of minift.kernels."""
    import importlib
    import pkgutil

    import minift.kernels as pkg
    import triton

    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"minift.kernels.{info.name}")
        found += [f"{info.name}.{name}" for name, obj in vars(module).items()
                  if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")]
    return sorted(found)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the records to this file")
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90")
    ap.add_argument("--kernel", action="append", help="only this kernel, e.g. rmsnorm_bwd (repeatable)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("kernel_compile: unset TRITON_INTERPRET (the interpreter does not compile)")
    records = run(tuple(a.arch or ARCHS), a.kernel)
    text = json.dumps(_report(records, argv), indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
