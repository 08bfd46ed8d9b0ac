"""Sparse token routing: a layer computes only the tokens its gate runs, and equals the reference.

The reference (every token computed, then selected) is the oracle: logits, greedy generations
with and without the cache, both granularities (skip="layer", skip="mlp"), left-padded batches.
Forward hooks on the projections count the rows actually computed.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from radial.routing import (
    GateTokenRouter,
    RandomTokenRouter,
    RoutedForCausalLM,
    SparseFallbackWarning,
    TokenRouter,
)
import radial.routing.sparse as sparse_module
from radial.routing.sparse import MIN_PACKED_ROWS, TokenBatch
from radial.utils import RadialError

ARCHS = ["llama", "qwen2", "mistral", "qwen3"]
NUM_LAYERS = 4
PAD = 2
FRACTIONS = [0.0, 0.5, 1.0]
SKIPS = ["layer", "mlp"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_base(arch: str):
    return make_tiny_model(arch, num_layers=NUM_LAYERS)


@pytest.fixture(scope="module", params=ARCHS)
def base(request):
    return make_base(request.param)


def token_routed(base, router=None, fraction=0.5, skip="layer"):
    router = router if router is not None else RandomTokenRouter(NUM_LAYERS, fraction=fraction, seed=1)
    return RoutedForCausalLM.from_base(copy.deepcopy(base), router=router, token_skip=skip)


def left_padded(lengths=(10, 6, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 300, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=PAD, **kwargs)


def reference_of(routed):
    return routed.token_execution_mode("reference")


class RowCounter:
    """Forward hooks counting the rows (tokens) each kind of projection computes."""

    def __init__(self, routed, parts=("q_proj", "k_proj", "o_proj", "mlp")):
        self.rows = dict.fromkeys(parts, 0)
        self.layer_calls = 0
        self._handles = []
        for layer in routed.parts.layers:
            modules = {"mlp": layer.mlp, **{name: getattr(layer.self_attn, name) for name in parts if name != "mlp"}}
            for name in parts:
                self._handles.append(modules[name].register_forward_hook(self._count(name)))
            self._handles.append(layer.register_forward_pre_hook(self._count_layer))

    def _count(self, name):
        def hook(module, args, output):
            self.rows[name] += args[0].reshape(-1, args[0].shape[-1]).shape[0]

        return hook

    def _count_layer(self, module, args):
        self.layer_calls += 1

    def remove(self):
        for handle in self._handles:
            handle.remove()


def running_per_layer(router, mask) -> list[int]:
    """Real tokens a RandomTokenRouter runs at each layer on this batch (its draws ignore hidden states)."""
    hidden = torch.zeros(*mask.shape, 1)
    return [int(((router(layer, hidden, mask) > 0) & mask.bool()).sum()) for layer in range(NUM_LAYERS)]


def packed_rows(count: int) -> int:
    """Rows a packed set of `count` tokens is computed as (a few tokens are padded to MIN_PACKED_ROWS)."""
    return MIN_PACKED_ROWS if 1 < count < MIN_PACKED_ROWS else count


# ----------------------------------------------------------------------------- equal to the reference
@pytest.mark.parametrize("skip", SKIPS)
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_sparse_logits_equal_the_reference(base, skip, fraction):
    routed = token_routed(base, fraction=fraction, skip=skip)
    ids, mask = left_padded()
    real = mask.bool()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", SparseFallbackWarning)
        sparse = routed(ids, attention_mask=mask).logits
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
    assert routed.token_execution == "sparse"
    assert (sparse - reference)[real].abs().max().item() <= 1e-4


@pytest.mark.parametrize("skip", SKIPS)
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_sparse_generation_equals_the_reference_with_and_without_cache(base, skip, fraction):
    routed = token_routed(base, fraction=fraction, skip=skip)
    ids, mask = left_padded(seed=1)
    with torch.no_grad():
        cached = greedy(routed, ids, mask, output_scores=True, return_dict_in_generate=True)
        uncached = greedy(routed, ids, mask, use_cache=False)
        with reference_of(routed):
            reference = greedy(routed, ids, mask, output_scores=True, return_dict_in_generate=True)
            reference_uncached = greedy(routed, ids, mask, use_cache=False)
    assert torch.equal(cached.sequences, reference.sequences)
    assert torch.equal(cached.sequences, uncached)
    assert torch.equal(reference.sequences, reference_uncached)
    for sparse_scores, reference_scores in zip(cached.scores, reference.scores):
        assert (sparse_scores - reference_scores).abs().max().item() <= 1e-4


@pytest.mark.parametrize("skip", SKIPS)
def test_hidden_state_gates_at_about_half_equal_the_reference(base, skip):
    router = GateTokenRouter(NUM_LAYERS, base.config.hidden_size)
    torch.manual_seed(3)
    for gate in router.gates:
        nn.init.normal_(gate.weight, std=1.0)
        nn.init.zeros_(gate.bias)  # random hyperplanes through the origin: about half the tokens run
    routed = token_routed(base, router=router, skip=skip)
    ids, mask = left_padded((12, 7, 9, 12), seed=2)
    with torch.no_grad():
        routed.reset_layer_counter()
        sparse = routed(ids, attention_mask=mask).logits
        executed = routed.radial_executed_layers()
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
    assert 0.2 * NUM_LAYERS < executed < 0.8 * NUM_LAYERS
    assert (sparse - reference)[mask.bool()].abs().max().item() <= 1e-4


def test_a_few_running_tokens_padded_to_the_minimum_rows_equal_the_reference():
    routed = token_routed(make_base("qwen2"), fraction=0.5)
    ids, mask = left_padded((6,), seed=15)  # one example: a few of its tokens run each layer
    assert sum(1 < count < MIN_PACKED_ROWS for count in running_per_layer(routed.router, mask)) >= 2
    with torch.no_grad():
        sparse = routed(ids, attention_mask=mask).logits
        generated = greedy(routed, ids, mask)
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
            reference_generated = greedy(routed, ids, mask)
    assert (sparse - reference).abs().max().item() <= 1e-4
    assert torch.equal(generated, reference_generated)


def test_right_padded_batch_equals_the_reference():
    routed = token_routed(make_base("llama"), fraction=0.5)
    ids, mask = left_padded((10, 4, 7), seed=14)
    ids, mask = ids.flip(1), mask.flip(1)  # the padding now trails
    with torch.no_grad():
        sparse = routed(ids, attention_mask=mask).logits
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
    assert torch.isfinite(sparse).all()
    assert (sparse - reference)[mask.bool()].abs().max().item() <= 1e-4


@pytest.mark.parametrize("skip", SKIPS)
def test_right_padded_rows_equal_each_row_alone(base, skip):
    """A right-padded batch attends causally without its padding mask: every real token as if alone."""
    routed = token_routed(base, fraction=0.5, skip=skip)
    ids, mask = left_padded((10, 4, 7), seed=15)
    ids, mask = ids.flip(1), mask.flip(1)
    with torch.no_grad():
        batched = routed(ids, attention_mask=mask).logits
        for row, length in enumerate(mask.sum(1).tolist()):
            alone = routed(ids[row : row + 1, :length], attention_mask=mask[row : row + 1, :length]).logits
            assert (batched[row, :length] - alone[0]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("padding", ["left", "right"])
def test_query_blocks_against_fewer_keys_equal_the_reference(base, padding, monkeypatch):
    """Packed queries attended in column blocks (here of 4+ columns), each block against the keys
    up to its last column: the same logits as the reference, and generations with and without the cache."""
    monkeypatch.setattr(sparse_module, "MIN_BLOCK_COLUMNS", 4)
    routed = token_routed(base, fraction=0.5)
    lengths = (19, 9, 14)
    ids, mask = left_padded(lengths, seed=21)
    if padding == "right":
        ids, mask = ids.flip(1), mask.flip(1)
    calls = []
    original = TokenBatch.query_layout

    def recording(self, running, keys):
        calls.append((self.seq_len, running.tokens.clone(), keys, original(self, running, keys)))
        return calls[-1][-1]

    monkeypatch.setattr(TokenBatch, "query_layout", recording)
    with torch.no_grad():
        sparse = routed(ids, attention_mask=mask).logits
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
    assert (sparse - reference)[mask.bool()].abs().max().item() <= 1e-4
    seq = ids.shape[1]
    prefill = [(tokens, keys, layout) for s, tokens, keys, layout in calls if s == seq and len(layout.blocks) > 1]
    assert prefill, "no layer was attended in blocks"
    for tokens, keys, layout in prefill:
        key_ends = [key_end for _, _, key_end in layout.blocks]
        assert key_ends == sorted(key_ends) and key_ends[-1] <= keys
        assert key_ends[0] < keys  # the first block reads fewer keys
        assert layout.slots.unique().numel() == tokens.numel()  # every running token attends exactly once
        assert torch.equal(layout.sources.index_select(0, layout.slots), tokens)  # with its own mask row
        for first, width, key_end in layout.blocks:  # ... in a block that reads its own key
            inside = (layout.slots >= first) & (layout.slots < first + len(lengths) * width)
            assert (tokens[inside] % seq < key_end - (keys - seq)).all()
    if padding == "left":  # generation continues after the last real token
        with torch.no_grad():
            cached = greedy(routed, ids, mask)
            uncached = greedy(routed, ids, mask, use_cache=False)
            with reference_of(routed):
                reference_generation = greedy(routed, ids, mask)
        assert torch.equal(cached, uncached) and torch.equal(cached, reference_generation)


@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_most_positions_running_attend_in_place_only_where_no_mask_is_needed(base, padding, monkeypatch):
    """Where most positions run a layer and the stock layer needs no mask (nothing cached, padding
    only on the right), the running queries attend at their own positions through the causal kernel;
    only they go through the query and output projections and the MLP, and the logits equal the
    reference's. Left padding needs the mask: the same gates attend packed."""
    routed = token_routed(base, fraction=0.9)
    ids, mask = left_padded((12, 12, 12) if padding == "none" else (12, 11, 12), seed=5)
    if padding == "right":
        ids, mask = ids.flip(1), mask.flip(1)
    ways = []
    for name in ("_attend_in_place", "_attend_packed"):
        original = getattr(sparse_module, name)

        def recording(*args, name=name, original=original, **kwargs):
            ways.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(sparse_module, name, recording)
    with torch.no_grad():
        routed(ids, attention_mask=mask)  # the one-time decomposition probe
        ways.clear()
        counter = RowCounter(routed)
        sparse = routed(ids, attention_mask=mask).logits
        counter.remove()
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
    assert (sparse - reference)[mask.bool()].abs().max().item() <= 1e-4
    real = int(mask.sum())
    running = running_per_layer(routed.router, mask)
    # A layer every real token runs is the stock call (every position), unless left padding needs the mask.
    stock_calls = sum(n == real and padding != "left" for n in running)
    sparse_counts = [n for n in running if n and (n < real or padding == "left")]
    in_place = [n >= sparse_module.IN_PLACE_MIN_SHARE * ids.numel() for n in sparse_counts]
    if padding == "left":
        assert ways == ["_attend_packed"] * len(sparse_counts)
    else:
        assert any(in_place), "no layer had enough positions running to attend in place"
        assert ways.count("_attend_in_place") == sum(in_place) and len(ways) == len(sparse_counts)
    computed = sum(packed_rows(n) for n in sparse_counts) + stock_calls * ids.numel()
    assert counter.rows["q_proj"] == counter.rows["o_proj"] == computed


def test_a_layer_every_real_token_runs_is_the_stock_call_on_a_right_padded_batch():
    """Right padding and nothing cached: a layer that all real tokens run goes through the stock
    layer (sdpa's causal kernel, padding computed and ignored) instead of packing the padding out."""
    routed = token_routed(make_base("llama"), fraction=1.0)
    ids, mask = left_padded((10, 4, 7), seed=14)
    ids, mask = ids.flip(1), mask.flip(1)
    with torch.no_grad():
        routed(ids, attention_mask=mask)  # the one-time decomposition probe
        counter = RowCounter(routed)
        sparse = routed(ids, attention_mask=mask).logits
        counter.remove()
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
    assert counter.layer_calls == NUM_LAYERS and counter.rows["q_proj"] == NUM_LAYERS * ids.numel()
    assert routed.radial_executed_layers() == NUM_LAYERS  # padding is not counted
    assert (sparse - reference)[mask.bool()].abs().max().item() <= 1e-4
    with torch.no_grad():  # left padding needs the mask, so the same gates pack the real tokens
        left_ids, left_mask = ids.flip(1), mask.flip(1)
        counter = RowCounter(routed)
        routed(left_ids, attention_mask=left_mask)
    assert counter.layer_calls == 0 and counter.rows["q_proj"] == NUM_LAYERS * int(mask.sum())


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_mixture_of_experts_decoders_route(arch):
    """MoE decoders wrap (dense routing = the model's own forward, checked by from_base), a static path
    with a skip and a repeat generates the same with and without the cache, and token routing runs
    sparsely and equals the reference."""
    from radial.routing import RoutedForCausalLM as Routed

    base = make_tiny_model(arch, num_layers=NUM_LAYERS)
    static = Routed.from_base(copy.deepcopy(base), paths=[0, 2, 2, 3])
    ids, mask = left_padded(seed=16)
    with torch.no_grad():
        assert torch.equal(greedy(static, ids, mask), greedy(static, ids, mask, use_cache=False))
        routed = token_routed(base, fraction=0.5)
        assert routed.token_execution == "sparse"
        sparse = routed(ids, attention_mask=mask).logits
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
    assert (sparse - reference)[mask.bool()].abs().max().item() <= 1e-4


def test_sliding_window_shorter_than_the_sequence():
    base = make_tiny_model("mistral", num_layers=NUM_LAYERS)
    base.config.sliding_window = 4
    routed = token_routed(base, fraction=0.5)
    ids, mask = left_padded((11, 7), seed=3)
    with torch.no_grad():
        sparse = routed(ids, attention_mask=mask).logits
        cached = greedy(routed, ids, mask)
        uncached = greedy(routed, ids, mask, use_cache=False)
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
            reference_generation = greedy(routed, ids, mask)
    assert (sparse - reference)[mask.bool()].abs().max().item() <= 1e-4
    assert torch.equal(cached, uncached) and torch.equal(cached, reference_generation)


# ----------------------------------------------------------------------------- what is computed
def test_fraction_zero_computes_only_the_keys_and_values():
    routed = token_routed(make_tiny_model("llama", num_layers=NUM_LAYERS), fraction=0.0)
    ids, mask = left_padded(seed=4)
    layer_calls = []  # like evaluate's LayerCounter: pre-hooks (they do not stop sparse execution)
    for layer in routed.parts.layers:
        layer.register_forward_pre_hook(lambda module, args: layer_calls.append(module))
    with torch.no_grad():
        routed(ids[:, :3], attention_mask=mask[:, :3])  # the first forward checks the layers once
        assert routed.token_execution == "sparse" and layer_calls == []  # the check calls no hooks
        counter = RowCounter(routed)
        routed(ids, attention_mask=mask, use_cache=False)
        assert counter.rows == {"q_proj": 0, "k_proj": 0, "o_proj": 0, "mlp": 0}  # no cache: nothing at all
        out = greedy(routed, ids, mask)
    new_tokens = out.shape[1] - ids.shape[1]
    assert counter.rows["q_proj"] == counter.rows["o_proj"] == counter.rows["mlp"] == 0
    # Every token, padding too, writes each layer's keys: the prompt, then one per decoding step.
    assert counter.rows["k_proj"] == NUM_LAYERS * ids.shape[0] * (ids.shape[1] + new_tokens - 1)
    assert counter.layer_calls == 0


def test_mlp_skip_at_fraction_zero_runs_attention_but_no_mlp():
    routed = token_routed(make_tiny_model("qwen2", num_layers=NUM_LAYERS), fraction=0.0, skip="mlp")
    ids, mask = left_padded(seed=5)
    with torch.no_grad():
        routed(ids[:, :3], attention_mask=mask[:, :3])
        counter = RowCounter(routed)
        routed(ids, attention_mask=mask)
    assert counter.rows["mlp"] == 0
    assert counter.rows["q_proj"] == NUM_LAYERS * ids.numel()


@pytest.mark.parametrize("skip", SKIPS)
def test_only_the_running_real_tokens_are_computed(skip):
    router = RandomTokenRouter(NUM_LAYERS, fraction=0.5, seed=7)
    routed = token_routed(make_tiny_model("llama", num_layers=NUM_LAYERS), router=router, skip=skip)
    ids, mask = left_padded((12, 5, 9), seed=6)
    running = running_per_layer(router, mask)
    assert 0 < sum(running) < NUM_LAYERS * int(mask.sum())
    computed = sum(map(packed_rows, running))
    assert computed < NUM_LAYERS * int(mask.sum())
    with torch.no_grad():
        routed(ids[:, :3], attention_mask=mask[:, :3])
        counter = RowCounter(routed)
        routed.reset_layer_counter()
        routed(ids, attention_mask=mask)
    assert counter.rows["mlp"] == computed
    assert counter.rows["q_proj"] == (computed if skip == "layer" else NUM_LAYERS * ids.numel())
    # Executed layers: per example, the mean over its real tokens of the layers they ran.
    per_example = [sum(running_per_layer(router, mask[row : row + 1])) / int(mask[row].sum()) for row in range(3)]
    assert routed.radial_executed_layers() == pytest.approx(sum(per_example) / len(per_example))


class PaddingOnlyRouter(TokenRouter):
    """Runs exactly the padding tokens: nothing real runs, so nothing should be computed or counted."""

    num_layers = NUM_LAYERS

    def forward(self, layer_idx, hidden_states, attention_mask):
        return 1.0 - 2.0 * attention_mask[:, -hidden_states.shape[1] :].float()


def test_padding_is_neither_computed_nor_counted():
    routed = token_routed(make_tiny_model("llama", num_layers=NUM_LAYERS), router=PaddingOnlyRouter())
    ids, mask = left_padded(seed=8)
    with torch.no_grad():
        routed(ids[:, :3], attention_mask=mask[:, :3])
        counter = RowCounter(routed)
        routed.reset_layer_counter()
        routed(ids, attention_mask=mask)
    assert counter.rows["mlp"] == 0 and counter.rows["q_proj"] == 0
    assert routed.radial_executed_layers() == 0


def test_recorded_runs_are_the_real_tokens_each_layer_computed():
    """What the FLOP count of the ideal speedup reads: per forward, the gates of each layer as executed."""
    from radial.routing.flops import Shape, ideal_speedup

    router = RandomTokenRouter(NUM_LAYERS, fraction=0.5, seed=5)
    routed = token_routed(make_tiny_model("llama", num_layers=NUM_LAYERS), router=router)
    ids, mask = left_padded(seed=9)
    with torch.no_grad():
        routed(ids, attention_mask=mask)  # outside the context: nothing kept
        assert routed._token_run_records is None
        with routed.recording_token_runs() as forwards:
            counter = RowCounter(routed)
            routed(ids, attention_mask=mask)
            counter.remove()
            routed(ids[:, :4], attention_mask=mask[:, :4], logits_to_keep=1)
    assert len(forwards) == 2 and forwards[1]["logit_rows"] == ids.shape[0]
    first = forwards[0]
    assert first["logit_rows"] == ids.numel() and first["attention_mask"] is mask
    running = [int((run & mask.bool()).sum()) for run in first["runs"]]
    assert running == running_per_layer(router, mask)
    assert counter.rows["mlp"] == sum(packed_rows(n) for n in running)  # what was computed
    assert 1.2 < ideal_speedup(Shape.of(routed.text_config), forwards) < 3.0  # about half the layers skipped


# ----------------------------------------------------------------------------- fallbacks, never silent
class Wrapped(nn.Module):
    """A decoder layer of a structure the sparse driver does not know."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("wrapped", [[1], list(range(NUM_LAYERS))])
def test_unknown_layer_structure_falls_back_to_the_reference_and_says_so(wrapped):
    base = make_tiny_model("llama", num_layers=NUM_LAYERS)
    for index in wrapped:
        base.model.layers[index] = Wrapped(base.model.layers[index])
    routed = token_routed(base, fraction=0.5)
    ids, mask = left_padded(seed=9)
    with torch.no_grad():
        with pytest.warns(SparseFallbackWarning, match="Wrapped has no input_layernorm"):
            sparse = routed(ids, attention_mask=mask).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error", SparseFallbackWarning)  # once, not on every forward
            routed(ids, attention_mask=mask)
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
    layers = ", ".join(map(str, wrapped))
    prefix = "reference (reason: " if len(wrapped) == NUM_LAYERS else "sparse except reference (reason: "
    assert routed.token_execution.startswith(f"{prefix}layer{'s' if len(wrapped) > 1 else ''} {layers}: Wrapped")
    assert (sparse - reference)[mask.bool()].abs().max().item() <= 1e-4


def test_a_layer_whose_forward_differs_from_its_parts_falls_back():
    base = make_tiny_model("qwen2", num_layers=NUM_LAYERS)
    layer = base.model.layers[2]
    stock_forward = layer.forward

    def half_residual_forward(hidden_states, *args, **kwargs):  # same parts, another composition
        return 0.5 * (hidden_states + stock_forward(hidden_states, *args, **kwargs))

    layer.forward = half_residual_forward
    routed = token_routed(base, fraction=0.5)
    with pytest.warns(SparseFallbackWarning, match="layer 2: its outputs differ"):
        assert routed.token_execution.startswith("sparse except reference (reason: layer 2: its outputs differ")
    ids, mask = left_padded(seed=10)
    with torch.no_grad():
        sparse = routed(ids, attention_mask=mask).logits
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
    assert (sparse - reference)[mask.bool()].abs().max().item() <= 1e-4


def test_forward_hooks_on_decoder_layers_get_every_token_through_the_reference():
    routed = token_routed(make_tiny_model("llama", num_layers=NUM_LAYERS), fraction=0.5)
    ids, mask = left_padded(seed=11)
    seen = []
    handle = routed.parts.layers[0].register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad(), pytest.warns(SparseFallbackWarning, match="forward hooks on decoder layers 0"):
        routed(ids, attention_mask=mask)
    assert seen == [torch.Size([*ids.shape, 32])]
    assert routed.token_execution.startswith("reference (reason: forward hooks")
    handle.remove()
    assert routed.token_execution == "sparse"


def test_straight_through_training_and_the_requested_reference_compute_every_token():
    router = GateTokenRouter(NUM_LAYERS, 32, init_bias=0.0)
    routed = token_routed(make_tiny_model("llama", num_layers=NUM_LAYERS), router=router).train()
    ids, mask = left_padded(seed=12)
    counter = RowCounter(routed)
    with routed.straight_through_token_gates() as gates:
        out = routed(ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert counter.layer_calls == NUM_LAYERS and len(gates) == NUM_LAYERS
    assert router.gates[0].weight.grad is not None and router.gates[0].weight.grad.abs().sum() > 0
    routed.eval()
    with torch.no_grad(), reference_of(routed):
        assert routed.token_execution.startswith("reference (reason: requested")
        routed(ids, attention_mask=mask)
    assert counter.layer_calls == 2 * NUM_LAYERS
    with pytest.raises(RadialError, match="token execution must be one of"):
        with routed.token_execution_mode("fast"):
            pass


# ----------------------------------------------------------------------------- config
def test_token_skip_is_saved_and_folders_without_it_load_as_layer(tmp_path):
    base = make_tiny_model("llama", num_layers=NUM_LAYERS)
    base.save_pretrained(tmp_path / "base")
    router = RandomTokenRouter(NUM_LAYERS, fraction=0.5, seed=3)
    routed = RoutedForCausalLM.from_base(str(tmp_path / "base"), router=router, token_skip="mlp")
    routed.save_pretrained(tmp_path / "routed")
    config_file = tmp_path / "routed" / "config.json"
    saved = json.loads(config_file.read_text())
    assert saved["token_skip"] == "mlp"
    reloaded = RoutedForCausalLM.from_pretrained(tmp_path / "routed")
    assert reloaded.config.token_skip == "mlp" and isinstance(reloaded.router, RandomTokenRouter)
    ids, mask = left_padded(seed=13)
    with torch.no_grad():
        assert torch.equal(routed(ids, attention_mask=mask).logits, reloaded(ids, attention_mask=mask).logits)
    del saved["token_skip"]
    config_file.write_text(json.dumps(saved))
    assert RoutedForCausalLM.from_pretrained(tmp_path / "routed").config.token_skip == "layer"
    with pytest.raises(RadialError, match="token_skip must be one of layer, mlp"):
        RoutedForCausalLM.from_base(base, router=router, token_skip="attention")


@pytest.mark.parametrize("skip", SKIPS)
def test_dlo_score_scaling_is_the_same_sparse_and_reference_and_trains_the_router(skip):
    """token_score_gap scales what a running token adds by 1 + (sigmoid(logit) - 0.5) * gap (DLO)."""
    base = make_base("llama")
    router = GateTokenRouter(NUM_LAYERS, base.config.hidden_size, init_bias=0.0)
    torch.manual_seed(3)
    for gate in router.gates:
        nn.init.normal_(gate.weight, std=2.0)
    routed = RoutedForCausalLM.from_base(copy.deepcopy(base), router=router, token_skip=skip, token_score_gap=0.5)
    plain = RoutedForCausalLM.from_base(copy.deepcopy(base), router=copy.deepcopy(router), token_skip=skip)
    ids, mask = left_padded()
    real = mask.bool()
    with torch.no_grad():
        sparse = routed(ids, attention_mask=mask, use_cache=False).logits
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask, use_cache=False).logits
        unscaled = plain(ids, attention_mask=mask, use_cache=False).logits
    assert routed.token_execution == "sparse"
    torch.testing.assert_close(sparse[real], reference[real], atol=1e-4, rtol=1e-4)
    assert (sparse[real] - unscaled[real]).abs().max() > 1e-3  # the scale is applied
    assert torch.equal(greedy(routed, ids, mask), greedy(routed, ids, mask, use_cache=False))

    routed.train()
    with reference_of(routed):
        loss = routed(ids, attention_mask=mask, labels=ids.masked_fill(~real, -100)).loss
    loss.backward()
    assert all(gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0 for gate in router.gates)
    assert json.loads(routed.config.to_json_string())["token_score_gap"] == 0.5


# ----------------------------------------------------------------------------- reuse
REUSE_PATH = [0, 0, 1, 2, 2, 3, 3]  # layers 0, 2 and 3 may run twice


class SlotRouter(TokenRouter):
    """Gates per token slot from a per-layer router: first slots as `inner` says, reuse slots `reuse` (a logit)."""

    def __init__(self, inner, path, reuse):
        super().__init__()
        self.inner, self.path, self.reuse, self.num_layers = inner, path, reuse, len(path)

    def forward(self, slot, hidden_states, attention_mask):
        if slot > 0 and self.path[slot - 1] == self.path[slot]:
            if isinstance(self.reuse, float):
                return hidden_states.new_full(hidden_states.shape[:2], self.reuse)
            return self.reuse(slot, hidden_states, attention_mask)
        return self.inner(self.path[slot], hidden_states, attention_mask)


def reuse_routed(base, router, **kwargs):
    return RoutedForCausalLM.from_base(copy.deepcopy(base), router=router, token_path=REUSE_PATH, **kwargs)


def test_reuse_slots_never_run_equal_the_student_without_reuse(base):
    inner = RandomTokenRouter(NUM_LAYERS, fraction=0.5, seed=3)
    ids, mask = left_padded(seed=21)
    with torch.no_grad():
        plain = token_routed(base, router=inner)(ids, attention_mask=mask).logits
        closed = reuse_routed(base, SlotRouter(inner, REUSE_PATH, -1.0))(ids, attention_mask=mask).logits
    assert (plain - closed)[mask.bool()].abs().max().item() <= 1e-5


def test_every_slot_run_is_the_static_path_with_those_repeats(base):
    """Keys and values per (layer, visit), as Dr.LLM's repeated layers have them: all gates open is the path."""
    ids, mask = left_padded(seed=22)
    routed = reuse_routed(base, RandomTokenRouter(len(REUSE_PATH), fraction=1.0))
    static = RoutedForCausalLM.from_base(copy.deepcopy(base), paths=REUSE_PATH)
    with torch.no_grad():
        sparse = routed(ids, attention_mask=mask).logits
        path = static(ids, attention_mask=mask).logits
    assert (sparse - path)[mask.bool()].abs().max().item() <= 1e-4
    assert torch.equal(greedy(routed, ids, mask), greedy(static, ids, mask))


@pytest.mark.parametrize("max_depth", [None, 4])
def test_reuse_is_sparse_equals_the_reference_and_caches_per_visit(base, max_depth):
    from radial.routing import RouterBudget

    routed = reuse_routed(base, RandomTokenRouter(len(REUSE_PATH), fraction=0.6, seed=5),
                          budget=RouterBudget(max_layers=max_depth))  # fmt: skip
    ids, mask = left_padded(seed=23)
    with torch.no_grad():
        assert routed.token_execution == "sparse"
        with routed.recording_token_runs() as records:
            sparse = routed(ids, attention_mask=mask)
        cached, uncached = greedy(routed, ids, mask), greedy(routed, ids, mask, use_cache=False)
        with reference_of(routed):
            reference = routed(ids, attention_mask=mask).logits
            reference_generation = greedy(routed, ids, mask)
    assert (sparse.logits - reference)[mask.bool()].abs().max().item() <= 1e-4
    assert torch.equal(cached, uncached) and torch.equal(cached, reference_generation)
    assert [step.layer for step in sparse.past_key_values.steps] == REUSE_PATH  # one cache entry per visit
    runs = torch.stack(records[0]["runs"]).sum(0)[mask.bool()]
    assert runs.max().item() <= (max_depth or len(REUSE_PATH)) and runs.max().item() > NUM_LAYERS // 2


def test_a_reuse_path_must_go_forward_and_match_its_router(base):
    with pytest.raises(RadialError, match="token_path must not go back"):
        RoutedForCausalLM.from_base(base, router=RandomTokenRouter(5), token_path=[0, 1, 1, 0, 2])
    with pytest.raises(RadialError, match="router has 4 layers, the base model 7 token slots"):
        RoutedForCausalLM.from_base(base, router=RandomTokenRouter(NUM_LAYERS), token_path=REUSE_PATH)


class FixedSlotRouter(TokenRouter):
    """Every layer's first slot runs every token; the reuse slot `slot` runs the positions `runs`, no other reuse slot runs."""

    def __init__(self, path, slot, runs):
        super().__init__()
        self.path, self.num_layers, self.slot, self.runs = path, len(path), slot, runs

    def forward(self, slot, hidden_states, attention_mask):
        if slot != self.slot:
            reuse = slot > 0 and self.path[slot - 1] == self.path[slot]
            return hidden_states.new_full(hidden_states.shape[:2], -1.0 if reuse else 1.0)
        open_ = torch.zeros(hidden_states.shape[:2], dtype=torch.bool)
        open_[:, self.runs] = True
        return torch.where(open_, 1.0, -1.0).to(hidden_states.dtype)


def test_a_reuse_slot_attends_to_its_visitors_alone(base):
    """The semantics by hand: layer 0 for all, then layer 0 again for positions R only, as if the
    sequence held just them (their own positions kept), then every later layer; no other keys."""
    seq, visitors = 9, [1, 4, 5, 8]
    ids = torch.randint(3, 300, (1, seq), generator=torch.Generator().manual_seed(31))
    routed = reuse_routed(base, FixedSlotRouter(REUSE_PATH, 1, visitors))
    parts, layers = routed.parts, routed.parts.layers
    with torch.no_grad():
        got = routed(ids).logits
        with reference_of(routed):
            reference = routed(ids).logits

        def layer(index, hidden, positions):
            rotary = parts.position_embeddings(hidden, positions, routed.layer_types)[routed.layer_types[index]]
            return parts.call_layer(layers[index], hidden, mask=None, position_ids=positions, position_embeddings=rotary)

        positions = torch.arange(seq).unsqueeze(0)
        hidden = layer(0, parts.embed(ids, None, positions), positions)
        hidden[:, visitors] = layer(0, hidden[:, visitors], positions[:, visitors])
        for index in range(1, NUM_LAYERS):
            hidden = layer(index, hidden, positions)
        expected = parts.logits(parts.final(hidden))
    assert (got - expected).abs().max().item() <= 1e-4
    assert (reference - expected).abs().max().item() <= 1e-4


def test_a_reuse_slot_nobody_takes_computes_no_keys_or_values(base):
    inner = RandomTokenRouter(NUM_LAYERS, fraction=0.5, seed=3)
    ids, mask = left_padded(seed=21)
    plain, closed = token_routed(base, router=inner), reuse_routed(base, SlotRouter(inner, REUSE_PATH, -1.0))
    rows = {}
    with torch.no_grad():
        for name, model in (("plain", plain), ("closed", closed)):
            model(ids[:, :3], attention_mask=mask[:, :3])  # the one-time decomposition probe
            counter = RowCounter(model, parts=("k_proj", "v_proj", "q_proj"))
            model(ids, attention_mask=mask)
            generated = greedy(model, ids, mask)
            counter.remove()
            rows[name] = (counter.rows, generated)
    assert rows["closed"][0] == rows["plain"][0]  # the three reuse slots add no projection at all
    assert torch.equal(rows["closed"][1], rows["plain"][1])


def test_a_reuse_slot_mask_keeps_the_visitors_and_for_the_reference_each_query_its_own_key():
    """Training's reference at a reuse slot: a token that skips it gets what taking it would give
    (the visitors' keys and its own: the straight-through counterfactual), never an empty row."""
    from radial.routing.sparse import restrict_keys

    causal = torch.ones(3, 5, dtype=torch.bool).tril(diagonal=2).view(1, 1, 3, 5)  # 2 cached keys, 3 queries
    visitors = torch.tensor([[True, False, False, True, False]])
    expected_visitors_only = [[1, 0, 0, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 0]]
    expected_with_own = [[1, 0, 1, 0, 0], [1, 0, 0, 1, 0], [1, 0, 0, 1, 1]]
    assert restrict_keys(causal, visitors, 1)[0, 0].int().tolist() == expected_visitors_only
    assert restrict_keys(causal, visitors, 1, own_keys=True)[0, 0].int().tolist() == expected_with_own
    additive = torch.zeros(1, 1, 3, 5).masked_fill(~causal, torch.finfo(torch.float32).min)
    restricted = restrict_keys(additive, visitors, 1, own_keys=True)[0, 0]
    assert (restricted == 0).int().tolist() == expected_with_own
