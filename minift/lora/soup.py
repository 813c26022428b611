"""Adapter soups: the weighted average of several LoRA adapters of one base, in PEFT format.

Each adapter's A (r, in) and B (out, r) matrices are averaged separately, key by key, as a model
soup averages whole weights (Wortsman et al. 2022). The update of the soup, scale * mean(B) @
mean(A), is not the mean of the updates scale * B_i @ A_i; the two agree when the adapters share
a starting point and stayed close to it (fine-tunes of one SFT adapter), which is the case
souping is meant for. Averaging k copies of one adapter gives that adapter back.

Adapters are only averaged when they plug into the same layers the same way: same base model,
rank, alpha, rsLoRA flag, target modules and tensor shapes; anything else is refused, naming the
adapter and the field.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minift.checks import check_number
from minift.files import atomic_write, write_json
from minift.lora.adapter import CONFIG_NAME, WEIGHTS_NAME, _load_tensors, read_adapter_config
from minift.models.context import ROPE_METADATA_KEY

# adapter_config.json fields that must agree for the A and B matrices to mean the same thing
MATCHING_FIELDS = ("base_model_name_or_path", "r", "lora_alpha", "use_rslora", "target_modules")


def _weights(weights, k):
    if weights is None:
        return [1.0 / k] * k
    weights = list(weights)
    if len(weights) != k:
        raise ValueError(f"average_adapters: {len(weights)} weights for {k} adapters")
    for i, w in enumerate(weights):
        check_number(f"average_adapters: weights[{i}]", w, ">= 0", lambda v: v >= 0)
    total = math.fsum(weights)
    if total <= 0:
        raise ValueError("average_adapters: the weights sum to 0; give at least one a positive "
                         "weight")
    return [w / total for w in weights]


def _normalized(config, field):
    value = config.get(field)
    if field == "target_modules" and isinstance(value, list):
        return sorted(value)
    if field == "use_rslora":
        return bool(value)
    return value


def _check_same(first_path, first, path, config, tensors, first_tensors):
    for field in MATCHING_FIELDS:
        mine, theirs = _normalized(first, field), _normalized(config, field)
        if mine != theirs:
            raise ValueError(f"average_adapters: {path} has {field}={theirs!r} but {first_path} "
                             f"has {field}={mine!r}; only adapters of one base with the same "
                             f"{field} can be averaged")
    if set(tensors) != set(first_tensors):
        extra = sorted(set(tensors) ^ set(first_tensors))
        raise ValueError(f"average_adapters: {path} and {first_path} adapt different layers "
                         f"(e.g. {extra[0]})")
    for key, t in tensors.items():
        if t.shape != first_tensors[key].shape:
            raise ValueError(f"average_adapters: {path}: tensor {key!r} has shape "
                             f"{tuple(t.shape)} but {tuple(first_tensors[key].shape)} in "
                             f"{first_path}")


# safetensors metadata an adapter's weights carry (adapter.write_adapter) that must agree across a
# soup and travel with it: the base's architecture and the stretched RoPE the adapters trained under
CARRIED_METADATA = ("base_model_type", ROPE_METADATA_KEY)


def _metadata(path: Path) -> dict:
    try:
        with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
            found = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"average_adapters: {path / WEIGHTS_NAME}: not a readable safetensors file ({e})") from None
    return {k: found[k] for k in CARRIED_METADATA if k in found}


def read_soup(paths, weights=None):
    """(averaged tensors, the config they go with, the weights' metadata) of the PEFT adapters in
    `paths`.

    See `average_adapters`; the config is the first adapter's. The metadata (base architecture,
    stretched RoPE) must be the same in every adapter: an adapter trained under
    `minift.extend_context` averaged with one that was not would be loaded under one RoPE.
    """
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    if not paths:
        raise ValueError("average_adapters: no adapter paths given")
    weights = _weights(weights, len(paths))
    for p in paths:
        if not p.is_dir():
            raise FileNotFoundError(f"average_adapters: adapter directory not found: {p}")
    first_config, first_tensors = read_adapter_config(paths[0]), _load_tensors(paths[0])
    first_meta = _metadata(paths[0])
    sums = {k: t.double() * weights[0] for k, t in first_tensors.items()}
    for path, w in zip(paths[1:], weights[1:]):
        config, tensors = read_adapter_config(path), _load_tensors(path)
        _check_same(paths[0], first_config, path, config, tensors, first_tensors)
        meta = _metadata(path)
        for key in CARRIED_METADATA:
            mine, theirs = first_meta.get(key), meta.get(key)
            if key == "base_model_type" and None in (mine, theirs):  # PEFT's own files lack it
                if theirs is not None:
                    first_meta[key] = theirs
                continue
            if mine != theirs:
                raise ValueError(f"average_adapters: {path} has {key}={theirs!r} in its weights' "
                                 f"metadata but {paths[0]} has {mine!r}; only adapters "
                                 f"trained on one base under one RoPE can be averaged")
        _warn_other_start(paths[0], first_tensors, path, tensors)
        for k, t in tensors.items():
            sums[k] += t.double() * w
    # float64 sums, stored back in each tensor's own dtype: k copies of one adapter average to
    # bit-identical tensors (w * x summed k times with w = 1/k rounds back to x in float32/16)
    state = {k: v.to(first_tensors[k].dtype).contiguous() for k, v in sums.items()}
    return state, first_config, first_meta


# Below this mean cosine similarity of their A matrices, two adapters did not start from one
# initialisation. A matrices move little in training (B starts at zero and carries the update),
# so fine-tunes of one start keep a similarity near 1, while independent random (r, in) starts
# are near 0 (about 1 / sqrt(r * in)).
SHARED_START_COSINE = 0.3


def _warn_other_start(first_path, first_tensors, path, tensors) -> None:
    """The soup's update is scale * mean(B) @ mean(A): averaging adapters of different random
    starts mixes unrelated A bases and loses what each learned; say so, naming both."""
    sims = [float(torch.nn.functional.cosine_similarity(tensors[k].double().flatten(),
                                                        first_tensors[k].double().flatten(), dim=0))
            for k in first_tensors if k.endswith("lora_A.weight")]
    if sims and sum(sims) / len(sims) < SHARED_START_COSINE:
        warnings.warn(f"average_adapters: {path} and {first_path} do not share a starting point "
                      f"(their A matrices have a mean cosine similarity of {sum(sims) / len(sims):.2f}); "
                      f"a soup of independently initialised adapters averages unrelated bases and "
                      f"usually scores below each of them", stacklevel=3)


def average_adapters(paths, weights=None):
    """The weighted average of several PEFT-format LoRA adapters, tensor by tensor.

    Args:
        paths: adapter directories (adapter_config.json + adapter_model.safetensors) of the same
            base, rank, alpha, rsLoRA flag and target modules.
        weights: one non-negative number per adapter, normalized to sum to 1; None = uniform.

    Returns:
        {key: tensor} keyed as in adapter_model.safetensors (``base_model.model.<module>
        .lora_A.weight``); `save_soup` writes it as an adapter directory.

    Raises:
        ValueError: adapters that differ in base, rank, alpha, rsLoRA, targets or shapes (naming
            both adapters and the field), or bad weights.
    """
    return read_soup(paths, weights)[0]


def save_soup(state, config, path, metadata=None):
    """Write averaged tensors and their adapter config as a PEFT adapter directory; `metadata`
    (read_soup's third value) goes into the weights' safetensors metadata beside "format"."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    meta = {"format": "pt", **(metadata or {})}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))
    write_json(path / CONFIG_NAME, config, sort_keys=True)


def soup(paths, out, weights=None):
    """`average_adapters` + `save_soup`; returns the output directory."""
    state, config, metadata = read_soup(paths, weights)
    save_soup(state, config, out, metadata)
    return Path(out)


def add_soup_arguments(parser) -> None:
    parser.add_argument("adapters", nargs="+", help="PEFT adapter directories of one base")
    parser.add_argument("--out", required=True, help="directory for the averaged adapter")
    parser.add_argument("--weights", default=None,
                        help="comma-separated weight per adapter, e.g. 0.5,0.3,0.2 (normalized); "
                             "default: uniform")


def run_soup(args, parser) -> int:
    """``python -m minift soup a b c --out d``: bad input is one line and exit code 2."""
    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            parser.error(f"--weights: expected comma-separated numbers, got {args.weights!r}")
    try:
        out = soup(args.adapters, args.out, weights)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    names = ", ".join(str(a) for a in args.adapters)
    print(f"averaged {len(args.adapters)} adapters ({names}) -> {out}")
    return 0
