"""minift/planning/long_context.py: a search of some cards or methods keeps the earlier results of
the others in the same JSON (the 80 GB searches run apart from the 24 GB ones)."""
import json

from minift.planning import long_context


def test_a_partial_search_keeps_the_other_cards_and_methods(tmp_path, monkeypatch):
    calls = []

    def fake_longest(preset, budget, recipe, *, step, method, memo):
        calls.append((method, budget))
        return {"seq_len": budget // 10**6, "traces": [{"seq_len": 1, "allocated": 2}]}

    monkeypatch.setattr(long_context, "longest", fake_longest)
    out = tmp_path / "lc.json"
    long_context.run(str(out), methods=("qlora", "lora"), cards=("24GB",))
    first = json.loads(out.read_text())["methods"]
    long_context.run(str(out), methods=("qlora",), cards=("48GB",))
    after = json.loads(out.read_text())["methods"]
    assert after["qlora"]["cards"]["24GB"] == first["qlora"]["cards"]["24GB"]  # kept, not searched again
    assert set(after["qlora"]["cards"]) == {"24GB", "48GB"}
    assert after["lora"] == first["lora"]  # a method not searched this time is kept whole
    assert calls == [("qlora", long_context.CARDS["24GB"] - long_context.RESERVE),
                     ("lora", long_context.CARDS["24GB"] - long_context.RESERVE),
                     ("qlora", long_context.CARDS["48GB"] - long_context.RESERVE)]
