"""examples/train_long_context.py end to end in --quick mode (its main() in this process: an
interpreter start-up costs more than the run)."""
import contextlib
import importlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_long_context.py"
# arm: (extend_context, S²-Attn, modules_to_save)
ARMS = {"full": ("yarn", True, ["embed_tokens", "norm"]), "no_s2": ("yarn", False, ["embed_tokens", "norm"]),
        "no_modules_to_save": ("yarn", True, None), "no_extend": (None, True, ["embed_tokens", "norm"])}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long_context")
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))  # it imports make_base beside it
    script = importlib.import_module("train_long_context")
    out, threads = io.StringIO(), torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(out):
            code = script.main(["--quick", "--out", str(tmp / "lc.json"), "--png", str(tmp / "lc.png")])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return json.loads((tmp / "lc.json").read_text()), out.getvalue(), tmp


@pytest.mark.slow
def test_the_json_has_every_arm_length_and_accuracy_in_range(quick_run):
    result, stdout, tmp = quick_run
    lengths = [str(64 * k) for k in (1, 2, 4)]
    assert set(result["before"]) == {"base", "extended"}
    assert set(result["arms"]) == set(ARMS)
    # stage 1 (the look-up at L, full fine-tuning) once per RoPE setting, shared by the arms
    assert set(result["after_task"]) == {"yarn", "none"}
    assert {name: entry["stage1"] for name, entry in result["arms"].items()} == {
        name: arm[0] or "none" for name, arm in ARMS.items()}
    for entry in result["after_task"].values():
        assert entry["stage1_task_at_L"]["method"] == "full"
    accuracies = [entry["accuracy"] for entry in result["before"].values()]
    accuracies += [entry["accuracy"] for entry in result["after_task"].values()]
    accuracies += [entry["accuracy_after"] for entry in result["arms"].values()]
    for acc in accuracies:
        assert list(acc) == lengths
        assert all(0.0 <= a <= 1.0 for a in acc.values())
    for name, entry in result["arms"].items():
        trials = entry["passkey_after"]["trials"]
        # --quick: 2 depths x 2 trials per length; each trial's verdict matches the reported mean.
        # A length is the prompt and its answer (" ", 4 digits, ".") together.
        assert len(trials) == 3 * 2 * 2
        answer = result["setup"]["answer_length"]
        assert answer == 6
        for n in lengths:
            cell = [t["correct"] for t in trials if t["length"] + answer == int(n)]
            assert len(cell) == 4
            assert entry["accuracy_after"][n] == pytest.approx(sum(cell) / len(cell))
        recipe = entry["recipe"]
        assert (recipe["extend_context"], recipe["s2_attention"], recipe["modules_to_save"]) == ARMS[name]
    assert result["data"]["eval_keys_in_training"] == 0
    # fresh 4-digit keys: the rows of both stages (96 + 48 in --quick) use almost as many keys
    assert result["data"]["train_keys"] > 0.9 * (96 + 48)
    assert "full after stage 2:" in stdout and (tmp / "lc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_the_full_recipe_s_loss_at_4x_falls(quick_run):
    full = quick_run[0]["arms"]["full"]
    before, after = full["heldout_loss_4x_before"], full["heldout_loss_4x_after"]
    # held-out rows of 4L tokens, scored with full attention, before and after stage 2: the passkey
    # answers (2.0 -> 1.8 in --quick) and prose (the base's own kind of text: about level)
    assert math.isfinite(after["answers"]) and after["answers"] < before["answers"]
    assert math.isfinite(after["text"]) and math.isfinite(before["text"])
    losses = full["stage2_extend_to_4L"]["losses"]
    assert len(losses) == full["stage2_extend_to_4L"]["steps"] and all(map(math.isfinite, losses))


def test_bad_flags_are_one_line_errors(capsys):
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    script = importlib.import_module("train_long_context")
    for argv, message in ((["--digits", "1"], "--digits must be 2..6, got 1"),
                          (["--arms", "full,nope"], "--arms: unknown ['nope']")):
        with pytest.raises(SystemExit) as exit_:
            script.parse(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
