"""The longest-context search of the long-context recipe (minift.planning.long_context), on the
tiny preset: the length found fits, the next step does not, and cards share their traces."""
import dataclasses

import pytest

from minift.models.config import ModelConfig
from minift.planning.estimate import estimate_memory
from minift.planning.long_context import RECIPE
from minift.planning.tables import longest


def test_the_recipe_names_what_it_assumes():
    assert all(RECIPE[m]["s2_attention"] for m in ("qlora", "lora", "full"))
    assert RECIPE["lora"]["modules_to_save"] == RECIPE["qlora"]["modules_to_save"] == ["embed_tokens", "norm"]
    assert "modules_to_save" not in RECIPE["full"]


@pytest.mark.slow  # a few dozen traces of the tiny preset
def test_longest_fits_and_the_next_step_does_not():
    settings = dict(RECIPE["lora"], mlp_tile_size=64, loss_chunk_size=64)

    def peak(t):
        cfg = dataclasses.replace(ModelConfig.from_name("tiny"), max_position_embeddings=1 << 21)
        return estimate_memory(cfg, "lora", 1, t, attention_mask=False, **settings).total

    budget = peak(1024) + (peak(2048) - peak(1024)) // 2  # between the two
    memo = {}
    found = longest("tiny", budget, settings, step=128, start=256, method="lora", memo=memo)
    assert 1024 <= found["seq_len"] < 2048
    assert found["fits_peak"] <= budget < found["next_step_peak"]
    assert found["next_step"] == found["seq_len"] + 128
    traced = len(memo)
    again = longest("tiny", budget, settings, step=128, start=256, method="lora", memo=memo)
    assert again["seq_len"] == found["seq_len"] and len(memo) == traced  # nothing traced twice
