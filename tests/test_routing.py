"""The routed model core: paths, exactness, batching, KV cache, routers, save/load, lm-eval."""

from __future__ import annotations

import copy
import json
import textwrap

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from radial.routing import (
    DrLLMRouter,
    FunctionRouter,
    GateTokenRouter,
    RoutedCache,
    RoutedForCausalLM,
    RouterBudget,
    counts_to_path,
    dense_path,
    path_to_counts,
    reference_forward,
    schedule,
)
from radial.utils import RadialError

ARCHS = ["llama", "qwen2", "mistral"]
NUM_LAYERS = 4
PAD = 2
MIXED_PATHS = [[0, 1, 3], [0, 0, 1, 2, 2, 3], [2, 0, 1], [1, 1], []]  # skips, repeats, non-monotone, empty


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=ARCHS)
def base(request):
    return make_tiny_model(request.param, num_layers=NUM_LAYERS)


@pytest.fixture(scope="module")
def routed(base):
    """Wraps its own copy of `base`, so a wrapper that touched the weights would show."""
    return RoutedForCausalLM.from_base(copy.deepcopy(base))


def random_sequences(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=generator) for n in lengths]


def pad(sequences, side):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        ids[row, span] = seq
        mask[row, span] = 1
    return ids, mask


def greedy(model, ids, mask=None, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, **kwargs)


# ----------------------------------------------------------------------------- paths
def test_path_counts_round_trip():
    assert path_to_counts([0, 1, 2, 4, 4, 5], 6) == [1, 1, 1, 0, 2, 1]
    assert counts_to_path([1, 1, 1, 0, 2, 1]) == (0, 1, 2, 4, 4, 5)
    with pytest.raises(RadialError, match="goes back"):
        path_to_counts([0, 2, 1], 3)
    with pytest.raises(RadialError, match="outside 0..3"):
        path_to_counts([0, 4], 4)


def test_schedule_runs_each_monotone_slot_once_on_its_rows():
    steps = schedule([[0, 1, 1, 3], [0, 2, 3], [1, 1]])
    assert [(s.layer, s.occurrence, s.row_list) for s in steps] == [
        (0, 0, (0, 1)),
        (1, 0, (0, 2)),
        (1, 1, (0, 2)),
        (2, 0, (1,)),
        (3, 0, (0, 1)),
    ]
    assert steps[0].rows.tolist() == [0, 1]
    assert schedule([[0, 1]] * 3)[0].rows is None  # every row: no gather needed


# ----------------------------------------------------------------------------- exactness
def test_all_execute_reproduces_base_logits(base, routed):
    ids = torch.stack(random_sequences([12, 12]))
    with torch.no_grad():
        expected = base(ids).logits
        got = routed(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("path", [[0, 1, 3], [0, 0, 1, 2, 2, 3], [3, 2, 1, 0], [2, 0, 2], [], [1, 1, 1]])
def test_any_path_equals_the_reference_loop(base, routed, path):
    ids = torch.stack(random_sequences([9, 9], seed=1))
    with torch.no_grad():
        got = routed(ids, paths=path).logits
        expected = reference_forward(base, ids, path)
        dense = base(ids).logits
    assert (got - expected).abs().max().item() <= 1e-5
    if list(path) != list(dense_path(NUM_LAYERS)):
        assert (got - dense).abs().max().item() > 1e-3  # the path really changed the model


# ----------------------------------------------------------------------------- batching
def test_mixed_paths_right_padded_batch_equals_each_alone(routed):
    sequences = random_sequences([7, 10, 5, 9, 6], seed=2)
    ids, mask = pad(sequences, "right")
    with torch.no_grad():
        batched = routed(ids, attention_mask=mask, paths=MIXED_PATHS).logits
        for row, (seq, path) in enumerate(zip(sequences, MIXED_PATHS)):
            alone = routed(seq[None], paths=path).logits[0]
            assert (batched[row, : len(seq)] - alone).abs().max().item() <= 1e-5


def test_mixed_paths_left_padded_generation_equals_each_alone_and_no_cache(routed):
    sequences = random_sequences([7, 10, 5, 9, 6], seed=3)
    ids, mask = pad(sequences, "left")
    with torch.no_grad():
        cached = greedy(routed, ids, mask, paths=MIXED_PATHS)
        uncached = greedy(routed, ids, mask, paths=MIXED_PATHS, use_cache=False)
        alone = [greedy(routed, seq[None], paths=path)[0, len(seq) :] for seq, path in zip(sequences, MIXED_PATHS)]
    assert torch.equal(cached, uncached)
    for row, tokens in enumerate(alone):
        assert torch.equal(cached[row, ids.shape[1] :], tokens)


def test_dense_generation_equals_base_generation(base, routed):
    ids, mask = pad(random_sequences([6, 9, 4], seed=4), "left")
    with torch.no_grad():
        assert torch.equal(greedy(routed, ids, mask), greedy(base, ids, mask))


# ----------------------------------------------------------------------------- KV cache
def test_each_layer_occurrence_owns_its_cache_slot(routed):
    ids, mask = pad(random_sequences([8, 5], seed=5), "left")
    paths = [[0, 0, 1, 3], [1, 3, 3]]
    with torch.no_grad():
        out = routed(ids, attention_mask=mask, paths=paths, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, RoutedCache)
    assert [(s.layer, s.occurrence, s.row_list) for s in cache.steps] == [
        (0, 0, (0,)),
        (0, 1, (0,)),
        (1, 0, (0, 1)),
        (3, 0, (0, 1)),
        (3, 1, (1,)),
    ]
    # Each slot holds the 8 prompt positions once, for exactly its rows: no double append.
    assert [tuple(storage.keys.shape[::2]) for storage in cache.layers] == [(1, 8), (1, 8), (2, 8), (2, 8), (1, 8)]
    assert cache.paths == [(0, 0, 1, 3), (1, 3, 3)]


def test_cached_decoding_logits_equal_full_recomputation(routed):
    ids, mask = pad(random_sequences([8, 5, 6], seed=6), "left")
    paths = [[0, 2, 2, 3], [1, 1, 3], [0, 1, 2, 3]]
    with torch.no_grad():
        out = greedy(routed, ids, mask, paths=paths, output_scores=True, return_dict_in_generate=True)
        full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1] :])], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        full = routed(out.sequences, attention_mask=full_mask, position_ids=positions, paths=paths).logits
    for step, scores in enumerate(out.scores):
        expected = full[:, ids.shape[1] - 1 + step]
        assert (scores - expected).abs().max().item() <= 1e-4


def test_sliding_window_slots_match_the_base_model():
    base = make_tiny_model("mistral", num_layers=NUM_LAYERS)
    base.config.sliding_window = 4  # shorter than the sequences, so the window matters
    routed = RoutedForCausalLM.from_base(copy.deepcopy(base))
    ids, mask = pad(random_sequences([10, 7], seed=11), "left")
    paths = [[0, 0, 2, 3, 3], [1, 3]]
    with torch.no_grad():
        assert (routed(ids, attention_mask=mask).logits - base(ids, attention_mask=mask).logits).abs().max() <= 1e-5
        assert torch.equal(greedy(routed, ids, mask), greedy(base, ids, mask))
        cached = greedy(routed, ids, mask, paths=paths)
        assert torch.equal(cached, greedy(routed, ids, mask, paths=paths, use_cache=False))
        base.config.sliding_window = None
        assert (routed(ids, attention_mask=mask).logits - base(ids, attention_mask=mask).logits).abs().max() > 1e-3


# ----------------------------------------------------------------------------- routers
def test_router_decides_at_prefill_and_the_path_stays_fixed(base):
    calls = []

    def decide(layer, hidden, mask):
        # Depends on the sequence length, so re-deciding while decoding would change the path.
        calls.append((layer, hidden.shape[1]))
        action = (hidden.shape[1] + layer) % 3
        return nn.functional.one_hot(torch.full((hidden.shape[0],), action), 3).float()

    routed = RoutedForCausalLM.from_base(copy.deepcopy(base), router=FunctionRouter(NUM_LAYERS, decide))
    ids = torch.stack(random_sequences([7, 7], seed=7))
    with torch.no_grad():
        cached = greedy(routed, ids)
        assert {length for _, length in calls} == {7} and len(calls) == NUM_LAYERS
        uncached = greedy(routed, ids, use_cache=False)
        out = routed(ids, use_cache=True)
    expected_path = tuple(layer for layer in range(NUM_LAYERS) for _ in range((7 + layer) % 3))
    assert out.past_key_values.paths == [expected_path] * 2
    assert torch.equal(cached, uncached)
    with torch.no_grad():
        assert torch.equal(cached, greedy(routed, ids, paths=expected_path))


def test_drllm_router_batched_decisions_equal_alone_and_budget_cuts_depth(base):
    torch.manual_seed(0)
    router = DrLLMRouter(NUM_LAYERS, base.config.hidden_size, bottleneck=16)
    routed = RoutedForCausalLM.from_base(copy.deepcopy(base), router=router)
    sequences = random_sequences([9, 4, 12], seed=8)
    ids, mask = pad(sequences, "left")
    with torch.no_grad():
        batched = routed(ids, attention_mask=mask, use_cache=True).past_key_values.paths
        alone = [routed(seq[None], use_cache=True).past_key_values.paths[0] for seq in sequences]
        assert batched == alone
        routed.set_budget(RouterBudget(skip_bias=100.0))
        routed.reset_layer_counter()
        routed(ids, attention_mask=mask)
        assert routed.radial_executed_layers() == 0
        routed.set_budget(RouterBudget(repeat_bias=100.0, max_layers=5))
        routed.reset_layer_counter()
        capped = routed(ids, attention_mask=mask, use_cache=True).past_key_values.paths
        assert capped == [(0, 0, 1, 1, 2)] * 3 and routed.radial_executed_layers() == 5


def test_example_router_decides_from_the_context_alone(base):
    """Every continuation of a question runs the path its context decides, in any right-padded batch."""
    torch.manual_seed(0)
    router = DrLLMRouter(NUM_LAYERS, base.config.hidden_size, bottleneck=16)
    for linear in (m for layer in router.layers for m in layer if isinstance(m, torch.nn.Linear)):
        torch.nn.init.normal_(linear.weight, std=3.0)  # decisive actions that vary with the input
    routed = RoutedForCausalLM.from_base(copy.deepcopy(base), router=router)
    contexts = random_sequences([9, 5, 12], seed=4)
    continuations = random_sequences([1, 4, 2, 6], seed=5)
    rows = [(c, torch.cat([c, a])) for c in contexts for a in continuations]
    ids, mask = pad([full for _, full in rows], "right")
    decision = torch.zeros_like(mask)
    for row, (context, _) in enumerate(rows):
        decision[row, : len(context)] = 1
    with torch.no_grad():
        batched = routed(ids, attention_mask=mask, decision_mask=decision, use_cache=True).past_key_values.paths
        alone = [routed(c[None], use_cache=True).past_key_values.paths[0] for c in contexts]
        undecided = routed(ids, attention_mask=mask, use_cache=True).past_key_values.paths
    assert batched == [alone[i // len(continuations)] for i in range(len(rows))]
    assert len(set(alone)) > 1  # the contexts really are routed differently
    assert undecided != batched  # reading the continuations too would change the paths


def test_token_router_reference_reproduces_base_and_caches_exactly(base):
    router = GateTokenRouter(NUM_LAYERS, base.config.hidden_size)
    routed = RoutedForCausalLM.from_base(copy.deepcopy(base), router=router)
    ids, mask = pad(random_sequences([8, 6], seed=9), "left")
    with torch.no_grad():
        assert (routed(ids).logits - base(ids).logits).abs().max().item() <= 1e-5
        # Make layer 1 skip the tokens whose first hidden feature is negative.
        router.gates[1].weight.zero_()
        router.gates[1].weight[0, 0] = 10.0
        router.gates[1].bias.zero_()
        routed.reset_layer_counter()
        cached = greedy(routed, ids, mask)
        executed = routed.radial_executed_layers()
        uncached = greedy(routed, ids, mask, use_cache=False)
    assert torch.equal(cached, uncached)
    assert 3 <= executed < NUM_LAYERS


# ----------------------------------------------------------------------------- errors, counting
def test_model_without_findable_layers_is_a_clear_error():
    class NotADecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])

    with pytest.raises(RadialError, match="cannot find the decoder layers"):
        RoutedForCausalLM.from_base(NotADecoder())


def test_decoder_whose_positions_the_driver_does_not_know_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(RadialError, match="cannot route GPT2LMHeadModel: GPT2Model has neither a rotary embedding"):
        RoutedForCausalLM.from_base(gpt2)


def test_wrapping_checks_dense_routing_against_the_models_own_forward():
    """Any family, Llama included: a forward that does more than embed, layers, norm and LM head is refused."""
    base = make_tiny_model("llama", num_layers=NUM_LAYERS)

    class DoubledLogits(type(base)):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 2
            return output

    base.__class__ = DoubledLogits
    with pytest.raises(RadialError, match=r"cannot route llama \(DoubledLogits\): .*max abs logit difference"):
        RoutedForCausalLM.from_base(base)


def test_a_family_whose_config_changes_the_forward_is_refused_naming_the_setting():
    from transformers import GraniteConfig, GraniteForCausalLM

    config = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, embedding_multiplier=12.0, logits_scaling=4.0)  # fmt: skip
    with pytest.raises(RadialError, match="cannot route granite .*logits_scaling=4.0, embedding_multiplier=12.0"):
        RoutedForCausalLM.from_base(GraniteForCausalLM(config).eval())


def test_wrapping_leaves_the_base_weights_untouched(base):
    before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    routed = RoutedForCausalLM.from_base(base, router=DrLLMRouter(NUM_LAYERS, base.config.hidden_size))
    assert all(torch.equal(before[name], tensor) for name, tensor in base.state_dict().items())
    assert base.config._attn_implementation == "sdpa" == routed.config._attn_implementation
    from radial.layers import find_decoder_layers

    assert find_decoder_layers(routed) is find_decoder_layers(base)  # what evaluate's layer hooks look for


def test_wrong_number_of_paths_is_a_clear_error(routed):
    with pytest.raises(RadialError, match="2 per-example paths for a batch of 3"):
        routed(torch.ones(3, 4, dtype=torch.long), paths=[[0], [1]])


def test_executed_layers_are_counted_per_example_and_forward(routed):
    routed.reset_layer_counter()
    with torch.no_grad():
        routed(torch.ones(2, 5, dtype=torch.long), paths=[[0, 1], [0, 0, 1, 2, 3, 3]])
        routed(torch.ones(1, 5, dtype=torch.long))
    assert routed.radial_executed_layers() == pytest.approx((2 + 6 + 4) / 3)


# ----------------------------------------------------------------------------- save / load
def test_save_load_round_trip_gives_identical_logits(tmp_path, tiny_tokenizer):
    base = make_tiny_model("qwen2", num_layers=NUM_LAYERS)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    torch.manual_seed(1)
    router = DrLLMRouter(NUM_LAYERS, base.config.hidden_size, bottleneck=16)
    routed = RoutedForCausalLM.from_base(str(base_dir), router=router, budget=RouterBudget(skip_bias=0.3))
    routed.save_pretrained(tmp_path / "routed")
    saved = json.loads((tmp_path / "routed" / "config.json").read_text())
    assert saved["model_type"] == "radial_routed" and saved["base_model_relative_path"] == "../base"
    assert not list((tmp_path / "routed").glob("model*.safetensors"))  # a reference, not a copy

    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "routed")
    assert isinstance(reloaded, RoutedForCausalLM) and reloaded.budget.skip_bias == 0.3
    ids, mask = pad(random_sequences([6, 9], seed=10), "left")
    with torch.no_grad():
        assert torch.equal(routed(ids, attention_mask=mask).logits, reloaded(ids, attention_mask=mask).logits)


# ----------------------------------------------------------------------------- lm-eval
def test_lm_eval_runs_routed_model_at_batch_size_above_one(tmp_path, tiny_tokenizer):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    rows = [
        {"question": f"{a}+{b}=", "answer": str(a + b), "choices": [str(a + b), str(a + b + 1)], "label": 0}
        for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4)]
    ]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = f"""
        dataset_path: json
        dataset_name: null
        dataset_kwargs: {{data_files: {{test: "{data}"}}}}
        test_split: test
        doc_to_text: "{{{{question}}}}"
    """
    (tmp_path / "mc.yaml").write_text(
        textwrap.dedent(common)
        + textwrap.dedent("""
            task: routing_tiny_mc
            output_type: multiple_choice
            doc_to_target: label
            doc_to_choice: choices
            metric_list: [{metric: acc}]
        """)
    )
    (tmp_path / "gen.yaml").write_text(
        textwrap.dedent(common)
        + textwrap.dedent("""
            task: routing_tiny_gen
            output_type: generate_until
            doc_to_target: answer
            generation_kwargs: {until: ["\\n"], do_sample: false, max_gen_toks: 4}
            metric_list: [{metric: exact_match}]
        """)
    )
    routed = RoutedForCausalLM.from_base(make_tiny_model("llama", num_layers=NUM_LAYERS), paths=[0, 2, 2])
    lm = HFLM(pretrained=routed, tokenizer=tiny_tokenizer, batch_size=3)
    batch_sizes = []
    routed.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(_batch_of(args, kwargs)), with_kwargs=True
    )
    task_manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    for task in ["routing_tiny_mc", "routing_tiny_gen"]:
        batch_sizes.clear()
        routed.reset_layer_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager)
        assert task in results["results"]
        assert max(batch_sizes) == 3  # loglikelihood and generate_until both batched through the routed forward
        assert routed.radial_executed_layers() == pytest.approx(3.0)  # path [0, 2, 2] of 4 layers


def _batch_of(args, kwargs) -> int:
    ids = args[0] if args else kwargs.get("input_ids")
    return ids.shape[0]
