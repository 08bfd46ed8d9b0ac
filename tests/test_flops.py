"""The FLOP count behind the ideal speedup of token routing (radial.routing.flops), by hand."""

from __future__ import annotations

import torch

from radial.routing.flops import Shape, forward_flops, ideal_speedup, layer_flops

# 2 layers, hidden 8, 2 query heads and 1 key-value head of 4, MLP 16, vocabulary 10. Per token:
# k and v projections 2*8*(2*1*4) = 128; q and o 2*8*2*4*2 = 256; scores and values 2*2*2*4 = 32 per
# key seen; MLP 2*3*8*16 = 768; LM head 2*8*10 = 160 per logit row.
SHAPE = Shape(num_layers=2, hidden=8, heads=2, kv_heads=1, head_dim=4, intermediate=16, vocab=10)


def _runs(*rows):
    return [torch.tensor([row], dtype=torch.bool) for row in rows]


def test_skipping_a_layer_saves_all_but_the_keys_and_values():
    # three tokens seeing 1, 2, 3 keys: a running token pays 256 + 32 k + 768, every token 128
    dense, routed = forward_flops(SHAPE, _runs([1, 1, 1], [1, 0, 0]), None, logit_rows=3, skip="layer")
    assert dense == 480 + 2 * (1056 + 1088 + 1120 + 3 * 128)
    assert routed == 480 + 2 * 3 * 128 + (1056 + 1088 + 1120) + 1056


def test_a_reuse_slot_is_paid_by_its_runners_alone():
    # slots [layer 0, layer 0 again, layer 1]: the reuse slot (index 1) charges no keys and values to
    # the tokens that skip it; run by the first token only, it costs that token's full layer
    runs = _runs([1, 1, 1], [1, 0, 0], [1, 1, 1])
    dense, routed = forward_flops(SHAPE, runs, None, logit_rows=3, skip="layer", reuse_slots=[False, True, False])
    assert dense == 480 + 2 * (1056 + 1088 + 1120 + 3 * 128)
    full_layer = 1056 + 1088 + 1120 + 3 * 128
    assert routed == 480 + 2 * full_layer + (1056 + 128)
    closed = forward_flops(SHAPE, _runs([1, 1, 1], [0, 0, 0], [1, 1, 1]), None, 3, "layer", [False, True, False])
    assert closed[1] == dense  # a reuse nobody takes costs nothing


def test_skipping_the_mlp_saves_only_the_mlp():
    dense, routed = forward_flops(SHAPE, _runs([1, 1, 1], [1, 0, 0]), None, logit_rows=3, skip="mlp")
    assert dense == 480 + 2 * (1056 + 1088 + 1120 + 3 * 128)  # the same dense model
    assert routed == 480 + 2 * (416 + 448 + 480) + 3 * 768 + 768


def test_every_token_running_is_no_saving_and_none_running_the_most():
    assert ideal_speedup(SHAPE, [{"runs": _runs([1, 1], [1, 1]), "attention_mask": None, "logit_rows": 2}]) == 1.0
    none = ideal_speedup(SHAPE, [{"runs": _runs([0, 0], [0, 0]), "attention_mask": None, "logit_rows": 2}])
    half = ideal_speedup(SHAPE, [{"runs": _runs([1, 0], [0, 1]), "attention_mask": None, "logit_rows": 2}])
    assert none > half > 1.0


def test_padding_counts_on_neither_side():
    plain = forward_flops(SHAPE, _runs([1, 0], [0, 1]), None, logit_rows=2)
    # the same two tokens right-padded by two: whatever the gates say of the padding
    padded = forward_flops(SHAPE, _runs([1, 0, 1, 0], [0, 1, 0, 1]), torch.tensor([[1, 1, 0, 0]]), logit_rows=2)
    assert padded == plain
    # left padding (generation): the real tokens see only the real keys before them
    left = forward_flops(SHAPE, _runs([0, 0, 1, 0], [0, 0, 0, 1]), torch.tensor([[0, 0, 1, 1]]), logit_rows=2)
    assert left == plain


def test_a_cached_token_attends_to_every_real_key_before_it():
    step = forward_flops(SHAPE, _runs([1], [1]), torch.tensor([[0, 1, 1, 1, 1]]), logit_rows=1)
    assert step[0] == 160 + 2 * (256 + 32 * 4 + 768 + 128)  # the fourth real key


def test_shape_from_a_hugging_face_config():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                         num_hidden_layers=3, vocab_size=50)  # fmt: skip
    assert Shape.of(config) == Shape(num_layers=3, hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, vocab=50)
    assert ideal_speedup(SHAPE, []) is None  # nothing recorded: no ideal


def test_shape_counts_what_one_token_s_mlp_computes_in_other_families():
    from conftest import make_tiny_model

    opt = Shape.of(make_tiny_model("opt").config)  # fc1, fc2 of ffn_dim; no grouped keys
    assert (opt.intermediate, opt.mlp_matrices, opt.kv_heads) == (64, 2, 4)
    assert Shape.of(make_tiny_model("gpt_neox").config).mlp_matrices == 2
    mixtral = Shape.of(make_tiny_model("mixtral").config)  # 2 of 4 experts per token, each 64 wide
    assert (mixtral.intermediate, mixtral.mlp_matrices) == (2 * 64, 3)
    qwen_moe = Shape.of(make_tiny_model("qwen2_moe").config)  # 2 experts of 32, plus the shared expert of 32
    assert qwen_moe.intermediate == 2 * 32 + 32
    mlp_only, _ = layer_flops(opt, torch.tensor([1]), skip="mlp")
    assert mlp_only.item() == 2 * 2 * 32 * 64
