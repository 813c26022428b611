"""The traced estimate equals the MemoryTracker of the real step, case by case (CPU path).

Each case of `minift.planning.agreement.CASES` runs on fake tensors and on real ones (FSDP
cases on two gloo processes); every category and the peak must agree within 1%, and the cases
on one process exactly.
"""
import pytest

from minift.planning.agreement import CASES, CATEGORY_KEYS, measured, traced


def test_at_least_thirty_cases_cover_every_axis():
    assert len(CASES) >= 30
    assert {c["method"] for c in CASES} == {"full", "lora", "qlora"}
    assert {c["config"].get("optimizer", "adamw") for c in CASES} >= {"adamw", "adamw8bit", "paged_adamw8bit"}
    assert any(c["config"].get("objective") == "dpo" for c in CASES)
    assert any(c["world_size"] == 2 for c in CASES)
    for feature in ("loss_chunk_size", "activation_offload", "optimizer_in_backward", "mlp_tile_size",
                    "paged_device_budget", "gradient_checkpointing"):
        assert any(feature in c["config"] for c in CASES), feature


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_trace_equals_the_real_step(case):
    fake, real = traced(case), measured(case)
    assert real["peak"] > 0 and fake["peak"] > 0
    for key in CATEGORY_KEYS:
        if case["world_size"] == 1:
            assert fake[key] == real[key], (key, fake[key], real[key])
        else:
            assert fake[key] == pytest.approx(real[key], rel=0.01), (key, fake[key], real[key])

