"""minift/training/compile.py and TrainConfig.compile."""
import pytest
import torch
from torch import nn

from minift.models.config import ModelConfig
from minift.models.llama import Llama
from minift.training.compile import compiled_layers
from minift.training.config import TrainConfig
from minift.training.loop import train

DATA = [{"input_ids": list(range(1, 13)), "labels": list(range(1, 13))} for _ in range(6)]


@pytest.mark.slow  # inductor compiles the layer's forward and backward: about a minute on 2 cores
def test_compiled_training_matches_eager(tmp_path):
    from torch._dynamo.utils import counters

    summaries = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = Llama(ModelConfig.from_name("tiny"))
        counters.clear()
        config = TrainConfig(method="full", max_steps=3, micro_batch_size=2, bf16=False,
                             learning_rate=1e-2, compile=compile_, progress=False,
                             output_dir=str(tmp_path / str(compile_)))
        summaries[compile_] = (train(model, DATA, config), counters["stats"]["unique_graphs"])
        assert all(layer._compiled_call_impl is None for layer in model.model.layers)  # restored
    (eager, eager_graphs), (compiled, compiled_graphs) = summaries[False], summaries[True]
    assert eager_graphs == 0 and compiled_graphs >= 1  # the compiled run really traced the layers
    # step 1 runs eagerly under the memory tracker; steps 2 and 3 through the compiled layers
    assert compiled["first_loss"] == pytest.approx(eager["first_loss"], rel=1e-6)
    assert compiled["last_loss"] == pytest.approx(eager["last_loss"], rel=1e-4)
    assert compiled["last_loss"] < compiled["first_loss"]


def test_compiled_layers_installs_and_restores():
    model = Llama(ModelConfig.from_name("tiny"))
    names = [n for n, _ in model.named_parameters()]
    with compiled_layers(model, True):
        assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
        assert [n for n, _ in model.named_parameters()] == names  # checkpoints keep their keys
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    with compiled_layers(model, False):
        assert model.model.layers[0]._compiled_call_impl is None


def test_compile_bad_input_is_named():
    with pytest.raises(ValueError, match="TrainConfig.compile=True, but the Linear has no 'model.layers' list of decoder layers"):
        with compiled_layers(nn.Linear(2, 2), True):
            pass
    with pytest.raises(TypeError, match="TrainConfig.compile must be True or False, got str 'yes'"):
        TrainConfig(compile="yes")
