"""Shared fixtures: tiny random decoder models (Llama, Qwen2, Mistral, Qwen3) with a local tokenizer.

Nothing here touches the Hugging Face Hub.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RADIAL_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))

_TOKENIZER_TEXTS = [
    "3+5-2=6\n7+4-9+2=4\n",
    "Question: Which gas do plants take in?\nAnswer: carbon dioxide\n",
    "A. water B. oxygen C. sand D. iron\n#### 42\n",
] * 20


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and never stall on a busy shared CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_user_tasks(folder: Path) -> Path:
    """Two lm-eval task YAMLs of a user's own, over small local jsonl files (none of radial's tasks):
    `toy_parity` (multiple choice; headline metric acc_norm, listed first) and `toy_echo` (generation)."""
    import json

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    parity = [{"question": f"Is {n} even or odd?", "choices": ["even", "odd"], "label": n % 2} for n in range(10)]
    echo = [{"word": word} for word in ("cat", "sun", "tree", "blue", "seven", "river")]
    for name, rows in (("parity", parity), ("echo", echo)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    tasks = {
        "toy_parity": common | {
            "dataset_kwargs": {"data_files": {"test": str(folder / "parity.jsonl")}},
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
        "toy_echo": common | {
            "dataset_kwargs": {"data_files": {"test": str(folder / "echo.jsonl")}},
            "output_type": "generate_until",
            "doc_to_text": "Repeat: {{word}}\nAnswer:",
            "doc_to_target": " {{word}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
    }
    for name, config in tasks.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"task": name} | config, sort_keys=False))
    return folder


def make_tokenizer():
    from radial.tokenizer import train_tokenizer

    return train_tokenizer(_TOKENIZER_TEXTS, vocab_size=320)


def make_tiny_model(arch: str, num_layers: int = 4, vocab_size: int = 320, seed: int = 0):
    """A random tiny causal LM of the given architecture, float32, eval mode.

    Llama-style: llama, qwen2, qwen3, mistral; mixture of experts: mixtral, qwen2_moe; other families:
    opt (pre-norm, final layer norm), opt_projected (OPT-350m's layout: post-norm, project_in/out, no
    final norm), gpt_neox (Pythia: parallel residual, partial rotary), gemma3 (sliding and full layers,
    a rotary table per type, logit soft-capping).
    """
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Gemma3TextConfig,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        OPTConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
    )

    tokens = {"vocab_size": vocab_size, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    if arch in ("opt", "opt_projected"):
        projected = arch == "opt_projected"
        config = OPTConfig(**tokens, hidden_size=32, ffn_dim=64, num_hidden_layers=num_layers, num_attention_heads=4,
                           max_position_embeddings=256, word_embed_proj_dim=16 if projected else 32,
                           do_layer_norm_before=not projected, dropout=0.0, tie_word_embeddings=False)  # fmt: skip
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(**tokens, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                               num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=256,
                               use_parallel_residual=True, tie_word_embeddings=False)  # fmt: skip
    elif arch == "gemma3":
        config = Gemma3TextConfig(**tokens, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"] * (num_layers // 2)
                                  + ["sliding_attention"] * (num_layers % 2),
                                  final_logit_softcapping=3.0, max_position_embeddings=256,
                                  tie_word_embeddings=False)  # fmt: skip
    else:
        config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config,
                      "mixtral": MixtralConfig, "qwen2_moe": Qwen2MoeConfig}[arch]  # fmt: skip
        moe = {
            "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
            "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                          "shared_expert_intermediate_size": 32},
        }.get(arch, {})  # fmt: skip
        config = config_cls(
            **moe,
            **tokens,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,  # hidden / heads; Qwen3 would otherwise default to 128
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny_model_dir(request, tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny random model folder (HF format, with tokenizer), one per architecture."""
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    make_tiny_model(request.param).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama").save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The local copy of the original benchmark files (../shared/data). Required, never skipped."""
    assert SHARED_DATA.is_dir(), f"benchmark files not found at {SHARED_DATA}; set RADIAL_SHARED_DATA"
    return SHARED_DATA


_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_distributed_env():
    """In-process DeepSpeed runs set RANK/MASTER_PORT for this process (whose process group keeps the port);
    a later subprocess that inherited them would take them for a launcher's and fail to bind the port."""
    before = {key: os.environ.get(key) for key in _DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow (the suite CI runs)")
    parser.addoption(
        "--integration",
        action="store_true",
        help="also run tests marked integration: workflow-level SIGKILL runs, MCTS optimality "
        "(tens of minutes on 2 cores)",
    )


def pytest_collection_modifyitems(config, items):
    """Without --slow / --integration, those tests are deselected (reported as such), never silently passed."""
    excluded = set()
    if not config.getoption("--slow"):
        excluded.add("slow")
    if not config.getoption("--integration"):
        excluded.add("integration")
    deselected = [item for item in items if excluded & set(item.keywords)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not excluded & set(item.keywords)]
