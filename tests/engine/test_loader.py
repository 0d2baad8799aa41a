"""Loading: HF directories (single and sharded), GGUF, dummy presets, the default model, and the
errors a user sees for bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixrt.models import ModelArgs, load_model
from radixrt.models.args import RopeScaling
from radixrt.models.default import check_chat_tokenizer, default_gguf_path
from radixrt.models.presets import preset_config
from tests.fixtures.tiny_models import PagedRunner, TinyModelDir, greedy_generate, hf_logits

# --------------------------------------------------------------------------- HF directories


def test_sharded_equals_single_file(tiny_model_dir: TinyModelDir) -> None:
    sharded_dir = tiny_model_dir("llama-sharded")
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1, "fixture should be sharded"
    single = load_model(tiny_model_dir("llama")).model.state_dict()
    sharded = load_model(sharded_dir).model.state_dict()
    assert single.keys() == sharded.keys()
    for name in single:
        assert torch.equal(single[name], sharded[name]), name


def test_load_to_dtype_and_tokenizer(tiny_model_dir: TinyModelDir) -> None:
    loaded = load_model(tiny_model_dir("qwen2"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert not loaded.model.training
    assert loaded.args.architecture == "Qwen2ForCausalLM" and loaded.args.attention_bias
    assert loaded.args.tie_word_embeddings and loaded.model.lm_head is None
    tok = loaded.tokenizer
    text = "héllo wörld 🙂 東京"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any UTF-8 round-trips
    assert tok.eos_token_id == 2 and loaded.args.eos_token_ids == (2,)
    ids = PagedRunner(loaded.model, page_size=4).step({0: tok.encode(text)})[0]
    assert ids.dtype == torch.float32 and torch.isfinite(ids).all()


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)


def test_directory_without_weights(tiny_model_dir: TinyModelDir, tmp_path: Path) -> None:
    shutil.copy(tiny_model_dir("llama") / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_model(tmp_path)


def test_unsupported_architecture(tiny_model_dir: TinyModelDir, tmp_path: Path) -> None:
    directory = _copy(tiny_model_dir("llama"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        load_model(directory)


def test_missing_and_unexpected_weights_are_named(
    tiny_model_dir: TinyModelDir, tmp_path: Path
) -> None:
    directory = _copy(tiny_model_dir("qwen3"), tmp_path)
    weights = load_file(str(directory / "model.safetensors"))
    dropped = "model.layers.1.self_attn.k_norm.weight"
    del weights[dropped]
    save_file(weights, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match=dropped.replace(".", r"\.")):
        load_model(directory)

    weights[dropped] = torch.ones(32)
    weights["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(weights, str(directory / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected weight.*extra_proj"):
        load_model(directory)


def test_shard_named_by_index_missing(tiny_model_dir: TinyModelDir, tmp_path: Path) -> None:
    directory = _copy(tiny_model_dir("llama-sharded"), tmp_path)
    victim = sorted(directory.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        load_model(directory)


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


# --------------------------------------------------------------------------- config parsing


def test_config_dialects_agree() -> None:
    old = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = {**old["rope_scaling"], "rope_theta": 500000.0}  # type: ignore[dict-item]
    a, b = ModelArgs.from_hf_config(old), ModelArgs.from_hf_config(new)
    assert a == b
    assert a.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert a.num_kv_heads == 4 and a.head_dim == 8  # defaults: MHA, hidden / heads


def test_config_errors() -> None:
    base = preset_config("llama-tiny")
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelArgs.from_hf_config({**base, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="missing 'low_freq_factor'"):
        ModelArgs.from_hf_config({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})


# --------------------------------------------------------------------------- dummy weights


def test_dummy_llama3_8b_on_meta() -> None:
    loaded = load_model("llama3-8b", load_format="dummy", device="meta", dtype=torch.bfloat16)
    a = loaded.args
    assert (a.vocab_size, a.hidden_size, a.num_layers, a.num_heads, a.num_kv_heads) == (
        128256,
        4096,
        32,
        32,
        8,
    )
    assert (a.intermediate_size, a.head_dim, a.rope_theta) == (14336, 128, 500000.0)
    assert a.eos_token_ids == (128001, 128009) and not a.tie_word_embeddings
    assert sum(p.numel() for p in loaded.model.parameters()) == 8_030_261_248  # Llama-3-8B
    assert loaded.tokenizer is None and loaded.source == "dummy:llama3-8b"


@pytest.mark.gpu
def test_dummy_llama3_8b_bf16_activations_stay_sane() -> None:
    loaded = load_model("llama3-8b", load_format="dummy", device="cuda", dtype=torch.bfloat16)
    runner = PagedRunner(loaded.model, page_size=16, num_pages=16)
    logits = runner.step({0: list(range(1000, 1200))}, all_logits=True)[0]
    assert torch.isfinite(logits).all() and 0 < logits.abs().max() < 100
    del loaded, runner
    torch.cuda.empty_cache()


def test_dummy_tiny_is_deterministic_and_sane() -> None:
    a = load_model("llama-tiny", load_format="dummy", dtype=torch.bfloat16, seed=1).model
    b = load_model("llama-tiny", load_format="dummy", dtype=torch.bfloat16, seed=1).model
    c = load_model("llama-tiny", load_format="dummy", dtype=torch.bfloat16, seed=2).model
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    ):
        assert torch.equal(pa, pb), name
        assert "norm" in name or not torch.equal(pa, pc), name
    logits = PagedRunner(a, page_size=16).step({0: list(range(3, 40))})[0]
    assert torch.isfinite(logits).all() and logits.abs().max() < 10


def test_dummy_from_directory(tiny_model_dir: TinyModelDir) -> None:
    loaded = load_model(tiny_model_dir("qwen3"), load_format="dummy")
    assert loaded.args.architecture == "Qwen3ForCausalLM" and loaded.args.head_dim == 32
    assert loaded.source.startswith("dummy:")


def test_unknown_preset() -> None:
    with pytest.raises(FileNotFoundError, match="llama-99b.*presets: .*llama3-8b"):
        load_model("llama-99b", load_format="dummy")


# --------------------------------------------------------------------------- default model

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default_loaded(default_model_dir: Path, monkeypatch_module: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    return load_model(default_model_dir)


@pytest.fixture(scope="module")
def monkeypatch_module():  # type: ignore[no-untyped-def]
    with pytest.MonkeyPatch.context() as mp:
        # Offline: loading must never reach for the hub.
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield mp


def test_default_model_tokenizer(default_loaded) -> None:  # type: ignore[no-untyped-def]
    tok = default_loaded.tokenizer
    check_chat_tokenizer(tok)  # ChatML + generation prompt, eos <|im_end|>, no BOS
    assert tok.eos_token_id == 2 and default_loaded.args.eos_token_ids == (2,)
    assert default_loaded.args.architecture == "LlamaForCausalLM"
    assert default_loaded.args.tie_word_embeddings


def test_default_model_matches_transformers(default_loaded, default_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.fixtures.tiny_models import load_hf_model

    hf = load_hf_model(default_model_dir)
    tok = default_loaded.tokenizer
    prompts = [
        "The capital of France is",
        "def fibonacci(n):\n    if n < 2:\n        return n",
        tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False),
    ]
    for text in prompts:
        ids = tok.encode(text)
        ours = PagedRunner(default_loaded.model, page_size=16).step({0: ids}, all_logits=True)[0]
        ref = hf_logits(hf, ids)
        torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-3)
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_default_model_answers_paris(default_loaded) -> None:  # type: ignore[no-untyped-def]
    tok = default_loaded.tokenizer
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    out = greedy_generate(
        default_loaded.model, tok.encode(prompt), max_new_tokens=16, stop_ids=(tok.eos_token_id,)
    )
    answer = tok.decode(out)
    assert "Paris" in answer, answer


@pytest.mark.slow  # dequantizes 135M parameters (~10 s of CPU)
def test_gguf_loads_same_weights_as_converted_dir(default_loaded) -> None:  # type: ignore[no-untyped-def]
    gguf = load_model(str(default_gguf_path()))  # a str path ending in .gguf selects GGUF
    assert gguf.source.endswith(".gguf") and gguf.args == default_loaded.args
    ours = default_loaded.model.state_dict()
    for name, tensor in gguf.model.state_dict().items():
        assert torch.equal(tensor, ours[name]), name


def test_default_model_path_lost_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process renames its copy into place first, ours is discarded, theirs used."""
    import radixrt.models.default as default

    monkeypatch.setenv("RADIXRT_CACHE_DIR", str(tmp_path))
    target = tmp_path / default._CACHE_SUBDIR
    calls = []

    def fake_convert(gguf: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
        target.mkdir()  # the racing process finishes first
        (target / "config.json").write_text('{"winner": true}')
        (target / "model.safetensors").write_text("")

    monkeypatch.setattr(default, "convert_gguf_to_hf", fake_convert)
    assert default.default_model_path() == target
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [target.name], "temp dir left behind"
    assert default.default_model_path() == target and len(calls) == 1  # cached: no reconversion
