"""TrainConfig.compile under torchrun: FSDP QLoRA on 2 gloo processes with compiled decoder layers
against the same run on one process without compilation.

With the default backend (Inductor): a QLoRA layer's FSDP2-gathered parameters are views of one
buffer in several dtypes, which Inductor's graph inputs cannot take (the NF4 matmul runs eagerly
for this, minift.nf4.fsdp); the "aot_eager" backends do not meet the problem. Slow: Inductor builds
its C++ kernels on the CPU.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_cases import LOSS_RTOL, WORLD, examples, free_port, join, make_model, train_config

import minift

pytestmark = pytest.mark.slow
# plain FSDP QLoRA (dist_cases' extras for this case turned off), compiled
FIELDS = dict(compile=True, save_interval=None, max_steps=2, optimizer="adamw", loss_chunk_size=None,
              gradient_checkpointing=False, activation_offload=False, mlp_tile_size=None)


def worker(rank, port, out):
    join(rank, port, WORLD, init=False)  # minift.train joins the group
    out = Path(out)
    try:
        summary = minift.train(make_model("qlora"), examples(), train_config(out, "fsdp", "qlora", WORLD, **FIELDS))
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        (out / f"rank{rank}.json").write_text(json.dumps({"summary": summary, "graphs": graphs}))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_compiled_fsdp_qlora_matches_one_eager_process(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    eager = minift.train(make_model("qlora"), examples(),
                         train_config(tmp_path / "one", "fsdp", "qlora", 1, **dict(FIELDS, compile=False)))
    for r in got:
        assert r["graphs"] > 0  # dynamo compiled graphs of the decoder layers on every rank
        assert (r["summary"]["world_size"], r["summary"]["parallel"]) == (WORLD, "fsdp")
        for key in ("first_loss", "last_loss"):
            assert r["summary"][key] == pytest.approx(eager[key], rel=LOSS_RTOL)
    assert got[0]["summary"]["last_loss"] != eager["first_loss"]
