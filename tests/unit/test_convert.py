"""HF conversion pieces that need no megatron model: config.json <-> ModelConfig both ways, the refusals
(one line each), the adapters' tensor placement (megatron's grouped QKV layout) and its exact inverse,
sharded safetensors in and out, and `init_from: hf:PATH` resolution. The conversions themselves (logits
against transformers, bitwise round trips, TP=2) are tests/convert/test_convert.py."""

from __future__ import annotations

import json

import pytest
import torch

from megaflow.config.schema import ModelConfig, RopeScaling, StageConfig
from megaflow.convert import hf_config
from megaflow.convert.families import adapter_for
from megaflow.convert.hf_config import hf_config_for, model_config_from_hf, model_differences
from megaflow.convert.safetensors_io import ShardedReader, parse_size, plan_shards, write_sharded
from megaflow.errors import UserError
from megaflow.training import init_from
from tests.conftest import REPO, run_megaflow

LLAMA31 = {  # as transformers 5.x writes Llama-3.1-8B's config.json
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "dtype": "bfloat16", "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                        "original_max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_type": "llama3"},
    "tie_word_embeddings": False, "transformers_version": "5.24.0", "use_cache": True, "vocab_size": 128256,
}
MISTRAL = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
           "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "head_dim": 128,
           "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "sliding_window": 4096,
           "vocab_size": 32000, "model_type": "mistral", "torch_dtype": "bfloat16"}
QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896, "intermediate_size": 4864,
         "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "max_position_embeddings": 32768,
         "max_window_layers": 24, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 32768,
         "use_sliding_window": False, "tie_word_embeddings": True, "vocab_size": 151936, "model_type": "qwen2"}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new", "attn_pdrop": 0.1, "embd_pdrop": 0.1,
        "layer_norm_epsilon": 1e-5, "model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_inner": None, "n_layer": 12,
        "n_positions": 1024, "resid_pdrop": 0.1, "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256}


def _old_style(config: dict) -> dict:
    """The same config as transformers 4.x writes it: rope_theta + rope_scaling, torch_dtype."""
    old = {k: v for k, v in config.items() if k not in ("rope_parameters", "dtype")}
    rope = dict(config["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = {**rope, "type": rope.pop("rope_type")} if rope.get("rope_type") != "default" else None
    old["torch_dtype"] = config["dtype"]
    return old


# --- config.json -> ModelConfig -------------------------------------------------------------------------------


def test_llama31_maps_the_same_from_both_rope_layouts():
    new, _ = model_config_from_hf(LLAMA31)
    old, _ = model_config_from_hf(_old_style(LLAMA31))
    assert not model_differences(new, old)
    assert (new.family, new.num_query_groups, new.kv_channels, new.rotary_base) == ("llama", 8, None, 500000.0)
    s = new.rope_scaling
    assert (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (8.0, 1.0, 4.0, 8192)
    assert s.megatron_defaults and not new.tie_embeddings and new.activation == "swiglu" and new.norm_epsilon == 1e-5
    # the preset megaflow ships for this model is the same model
    preset = ModelConfig(**{**_preset("llama3.1-8b"), "vocab_size": 128256})
    assert not model_differences(preset, new, scope="shapes")


def _preset(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "configs" / "models" / f"{name}.yaml").read_text())["model"]


def test_families():
    qwen, _ = model_config_from_hf(QWEN2)
    assert qwen.add_qkv_bias and not qwen.add_bias_linear and qwen.tie_embeddings and qwen.num_query_groups == 2
    assert qwen.max_position_embeddings == 32768  # use_sliding_window false: the window changes nothing
    gpt2, _ = model_config_from_hf(GPT2)
    assert (gpt2.family, gpt2.position_embedding, gpt2.normalization, gpt2.activation) == ("gpt2", "learned", "LayerNorm", "gelu_tanh")
    assert gpt2.tie_embeddings and gpt2.add_bias_linear and gpt2.ffn_hidden_size == 3072 and gpt2.hidden_dropout == 0.1
    assert not model_differences(gpt2, ModelConfig(**{**_preset("gpt2-124m"), "hidden_dropout": 0.1,
                                                      "attention_dropout": 0.1}))
    odd_head, _ = model_config_from_hf({**MISTRAL, "head_dim": 64, "sliding_window": None})
    assert odd_head.kv_channels == 64  # 32 heads x 64 != 4096


def test_mistral_sliding_window_is_mapped_to_a_shorter_context():
    model, notes = model_config_from_hf(MISTRAL)
    assert model.max_position_embeddings == 4096
    assert len(notes) == 1 and "sliding_window=4096" in notes[0] and "identical to MistralForCausalLM up to 4096" in notes[0]
    model, notes = model_config_from_hf({**MISTRAL, "sliding_window": None})
    assert model.max_position_embeddings == 32768 and not notes


@pytest.mark.parametrize("change, needle", [
    ({"architectures": ["FalconForCausalLM"]}, "architecture 'FalconForCausalLM' is not supported (supported: "
                                               "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel)"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "RoPE type 'yarn' is not supported (supported: default, llama3)"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor=0.5"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "per-layer-type RoPE parameters"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for LlamaForCausalLM (supported: silu"),
    ({"attention_bias": True}, "attention_bias=True with mlp_bias=False is not supported"),
    ({"hidden_size": None}, "missing 'hidden_size'"),
])
def test_refusals_are_one_line(change, needle):
    with pytest.raises(UserError) as e:
        model_config_from_hf({**LLAMA31, **change}, "x/config.json")
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("x/config.json: ")


def test_gpt2_refusals():
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        model_config_from_hf({**GPT2, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(UserError, match="activation_function='relu' is not supported for GPT2LMHeadModel"):
        model_config_from_hf({**GPT2, "activation_function": "relu"})


# --- ModelConfig -> config.json -------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [LLAMA31, MISTRAL, QWEN2, GPT2], ids=["llama31", "mistral", "qwen2", "gpt2"])
def test_unchanged_model_writes_the_original_config(config):
    model, _ = model_config_from_hf(config)
    arch = config["architectures"][0]
    assert hf_config_for(model, config, arch, None) == config
    # a megaflow stage that trained it (other dropout, other preset label) is still the same model
    trained = model.model_copy(update={"hidden_dropout": 0.0, "attention_dropout": 0.0, "preset": "x"})
    assert hf_config_for(trained, config, arch, None) == config


def test_changed_model_updates_megaflows_keys_only():
    model, _ = model_config_from_hf(_old_style(LLAMA31))
    longer = model.model_copy(update={"num_layers": 2, "rotary_base": 1e6})
    out = hf_config_for(longer, _old_style(LLAMA31), "LlamaForCausalLM", None)
    assert out["num_hidden_layers"] == 2 and out["bos_token_id"] == 128000 and out["pretraining_tp"] == 1
    if (hf_config.transformers_major() or 5) >= 5:  # written the installed transformers' way
        assert out["rope_parameters"]["rope_theta"] == 1e6 and out["rope_parameters"]["rope_type"] == "llama3"
        assert "rope_scaling" not in out and "rope_theta" not in out and out["dtype"] == "bfloat16"
    assert not model_differences(model_config_from_hf(out)[0], longer)


def test_a_longer_context_than_the_window_drops_the_window():
    model, _ = model_config_from_hf(MISTRAL)
    assert hf_config_for(model, MISTRAL, "MistralForCausalLM", None) == MISTRAL
    longer = model.model_copy(update={"max_position_embeddings": 32768})  # trained with full attention
    out = hf_config_for(longer, MISTRAL, "MistralForCausalLM", None)
    assert out["sliding_window"] is None and out["max_position_embeddings"] == 32768


@pytest.mark.parametrize("overrides, arch", [
    ({}, "LlamaForCausalLM"),
    ({"add_qkv_bias": True, "tie_embeddings": True, "num_query_groups": 2}, "Qwen2ForCausalLM"),
    ({"rope_scaling": {"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                       "original_max_position_embeddings": 512}, "kv_channels": 32}, "LlamaForCausalLM"),
    (dict(family="gpt2", position_embedding="learned", normalization="LayerNorm", activation="gelu_tanh",
          add_bias_linear=True, tie_embeddings=True), "GPT2LMHeadModel"),
])
def test_megaflow_models_get_an_hf_config_that_maps_back(overrides, arch):
    model = ModelConfig(hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=300, **overrides)
    out = hf_config_for(model, None, None, "float32")
    assert out["architectures"] == [arch]
    assert not model_differences(model_config_from_hf(out)[0], model)


def test_generated_config_is_one_transformers_reads():
    transformers = pytest.importorskip("transformers")
    model = ModelConfig(hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96, vocab_size=300,
                        rope_scaling={"factor": 8.0}, rotary_base=500000)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in hf_config_for(model, None, None, "float32").items()})
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (2, 16, 300)
    rope = cfg.rope_parameters if hasattr(cfg, "rope_parameters") else {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0 and rope["rope_theta"] == 500000


def test_model_without_hf_architecture_is_refused():
    model = ModelConfig(normalization="LayerNorm")  # RoPE + LayerNorm: neither Llama nor GPT-2
    with pytest.raises(UserError, match="no Hugging Face architecture: supported are"):
        hf_config_for(model, None, None, "float32")


def test_a_changed_model_must_still_fit_its_architecture():
    model, _ = model_config_from_hf(MISTRAL)
    with pytest.raises(UserError, match="cannot be written as MistralForCausalLM: Mistral has no biases"):
        hf_config_for(model.model_copy(update={"add_bias_linear": True}), MISTRAL, "MistralForCausalLM", None)
    gpt2, _ = model_config_from_hf(GPT2)
    with pytest.raises(UserError, match="GPT-2 has neither grouped-query attention"):
        hf_config_for(gpt2.model_copy(update={"num_query_groups": 4}), GPT2, "GPT2LMHeadModel", None)


def test_rope_scaling_schema():
    assert RopeScaling(factor=8).megatron_defaults and not RopeScaling(low_freq_factor=2).megatron_defaults
    with pytest.raises(ValueError, match="high_freq_factor"):
        RopeScaling(low_freq_factor=4, high_freq_factor=4)


# --- adapters -----------------------------------------------------------------------------------------------


def _megatron_params(model: ModelConfig, padded: int, fill=float("nan")) -> dict[str, torch.Tensor]:
    """Tensors shaped as megatron's TP=1 parameters (local spec names)."""
    h, f, nh = model.hidden_size, model.ffn_hidden_size, model.num_attention_heads
    d, ng = model.kv_channels or h // nh, model.query_groups
    qkv, bias, ln_bias = (nh + 2 * ng) * d, model.add_bias_linear, model.normalization == "LayerNorm"
    shapes = {"embedding.word_embeddings.weight": (padded, h), "decoder.final_layernorm.weight": (h,)}
    if model.position_embedding == "learned":
        shapes["embedding.position_embeddings.weight"] = (model.max_position_embeddings, h)
    if not model.tie_embeddings:
        shapes["output_layer.weight"] = (padded, h)
    if ln_bias:
        shapes["decoder.final_layernorm.bias"] = (h,)
    fc1 = 2 * f if model.activation == "swiglu" else f
    for i in range(model.num_layers):
        p = f"decoder.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "pre_mlp_layernorm.weight": (h,),
                   p + "self_attention.linear_qkv.weight": (qkv, h), p + "self_attention.linear_proj.weight": (h, nh * d),
                   p + "mlp.linear_fc1.weight": (fc1, h), p + "mlp.linear_fc2.weight": (h, f)}
        if bias or model.add_qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv,)
        if bias:
            shapes |= {p + "self_attention.linear_proj.bias": (h,), p + "mlp.linear_fc1.bias": (fc1,),
                       p + "mlp.linear_fc2.bias": (h,)}
        if ln_bias:
            shapes |= {p + "input_layernorm.bias": (h,), p + "pre_mlp_layernorm.bias": (h,)}
    return {k: torch.full(s, fill) for k, s in shapes.items()}


def test_qkv_goes_into_megatrons_grouped_layout():
    """Per query group: its query heads, then its key head, then its value head (megatron attention.py:
    `q1 q2 k1 v1 | q3 q4 k2 v2`)."""
    model = ModelConfig(hidden_size=8, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=4, num_layers=1,
                        vocab_size=10)
    adapter = adapter_for("LlamaForCausalLM", model, 16)
    params = _megatron_params(model, 16, fill=0.0)
    for proj, base, rows in (("q_proj", 100, 8), ("k_proj", 200, 4), ("v_proj", 300, 4)):
        adapter.load(f"model.layers.0.self_attn.{proj}.weight",
                     (base + torch.arange(rows, dtype=torch.float32))[:, None].expand(rows, 8), params)
    order = params["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist()
    heads = [100, 101, 102, 103, 200, 201, 300, 301, 104, 105, 106, 107, 202, 203, 302, 303]  # head dim 2
    assert order == heads


CASES = {
    "llama-gqa-tied-lm_head-present": ("LlamaForCausalLM", dict(num_query_groups=2, tie_embeddings=True), True),
    "llama-biases": ("LlamaForCausalLM", dict(add_bias_linear=True, kv_channels=8), False),
    "mistral": ("MistralForCausalLM", dict(num_query_groups=1), False),
    "qwen2": ("Qwen2ForCausalLM", dict(num_query_groups=2, add_qkv_bias=True), False),
    "gpt2": ("GPT2LMHeadModel", dict(family="gpt2", position_embedding="learned", normalization="LayerNorm",
                                     activation="gelu_tanh", add_bias_linear=True, tie_embeddings=True), False),
    "gpt2-untied": ("GPT2LMHeadModel", dict(family="gpt2", position_embedding="learned", normalization="LayerNorm",
                                            activation="gelu", add_bias_linear=True), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_parameter_is_covered_and_export_inverts_load_bitwise(case):
    arch, overrides, lm_head_present = CASES[case]
    model = ModelConfig(hidden_size=16, num_attention_heads=4, ffn_hidden_size=24, num_layers=2, vocab_size=37,
                        max_position_embeddings=12, **overrides)
    names = ["lm_head.weight"] if lm_head_present else None
    adapter = adapter_for(arch, model, 128, names=names)
    params = _megatron_params(model, 128)
    g = torch.Generator().manual_seed(0)
    hf = {name: torch.randn(shape, generator=g) for name, shape in adapter.specs()}
    for name, tensor in hf.items():
        adapter.load(name, tensor, params)
    adapter.pad_rows(params)
    unfilled = [k for k, p in params.items() if torch.isnan(p).any()]
    assert not unfilled
    assert params["embedding.word_embeddings.weight"][37:].abs().sum() == 0
    for name, tensor in hf.items():
        if adapter.slots[name].kind != "tied":
            out = adapter.export(name, params)
            assert out.is_contiguous() and torch.equal(out, tensor), name
    assert ("lm_head.weight" in hf) == (lm_head_present or not model.tie_embeddings)


def test_gpt2_names_without_prefix_and_old_buffers():
    model = ModelConfig(**{**CASES["gpt2"][1], "hidden_size": 16, "num_attention_heads": 4, "ffn_hidden_size": 64,
                           "num_layers": 1, "vocab_size": 37, "max_position_embeddings": 12})
    adapter = adapter_for("GPT2LMHeadModel", model, 128, names=["wte.weight", "h.0.attn.bias"])
    assert "wte.weight" in adapter.slots and "h.0.attn.c_attn.weight" in adapter.slots
    assert adapter.ignored("h.0.attn.bias") and adapter.ignored("h.0.attn.masked_bias")
    assert not adapter.ignored("h.0.attn.c_attn.bias")


def test_check_names_errors():
    model = ModelConfig(hidden_size=16, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=24, num_layers=1,
                        vocab_size=37)
    adapter = adapter_for("LlamaForCausalLM", model, 128)
    found = dict(adapter.specs())
    adapter.check_names(found, "d")  # all there
    with pytest.raises(UserError, match=r"d: 1 tensor\(s\) missing for LlamaForCausalLM .*: model.norm.weight"):
        adapter.check_names({k: v for k, v in found.items() if k != "model.norm.weight"}, "d")
    with pytest.raises(UserError, match=r"not part of LlamaForCausalLM .*: model.layers.0.self_attn.q_proj.bias"):
        adapter.check_names({**found, "model.layers.0.self_attn.q_proj.bias": (16,)}, "d")
    with pytest.raises(UserError, match=r"k_proj.weight has shape \[16, 16\], expected \[8, 16\] \(from config.json: "
                                        r"hidden 16, layers 1, heads 4, kv heads 2, head dim 4"):
        adapter.check_names({**found, "model.layers.0.self_attn.k_proj.weight": (16, 16)}, "d")
    adapter.check_names({**found, "model.layers.0.self_attn.rotary_emb.inv_freq": (2,)}, "d")  # an old buffer


# --- safetensors ------------------------------------------------------------------------------------------


def test_sizes_and_shard_plan():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KB") == 40_000 and parse_size("1MiB") == 2**20
    with pytest.raises(UserError, match="not a size"):
        parse_size("lots")
    with pytest.raises(UserError, match="must be more than 0 bytes"):
        parse_size("0")
    specs = [("a", (10,), 4), ("b", (10,), 4), ("c", (100,), 4), ("d", (5,), 4)]
    assert plan_shards(specs, 80) == [["a", "b"], ["c"], ["d"]]  # c alone is larger than the limit
    assert plan_shards(specs, 10**6) == [["a", "b", "c", "d"]]


def test_sharded_write_and_read(tmp_path):
    tensors = {f"t{i}": torch.randn(8, 8).to(torch.bfloat16 if i % 2 else torch.float32) for i in range(5)}
    specs = [(k, tuple(t.shape), t.element_size()) for k, t in tensors.items()]
    files = write_sharded(tmp_path, specs, tensors.__getitem__, 300, progress=False)
    assert len(files) == 5 and (tmp_path / "model.safetensors.index.json").is_file()
    reader = ShardedReader(tmp_path)
    assert {k: (i.shape, i.dtype) for k, i in reader.tensors.items()} == {
        k: ((8, 8), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()}
    for shard in reader.shards:
        for name, t in reader.iter_shard(shard):
            assert torch.equal(t, tensors[name])
    single = tmp_path / "single"
    single.mkdir()
    assert write_sharded(single, specs, tensors.__getitem__, 10**6, progress=False) == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists() and len(ShardedReader(single).tensors) == 5
    (tmp_path / files[2]).unlink()
    with pytest.raises(UserError, match=r"missing shard file\(s\) model-00003-of-00005.safetensors \(1 of 5\)"):
        ShardedReader(tmp_path)


def test_missing_weights(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=r"no weights: expected model.safetensors or model.safetensors.index.json .*"
                                        r"found pytorch_model.bin: only safetensors"):
        ShardedReader(tmp_path)


def test_cli_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["FalconForCausalLM"], "model_type": "falcon"}))
    proc = run_megaflow("convert", "hf-to-megaflow", "--hf", str(hf), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"megaflow: error: {hf}/config.json: architecture 'FalconForCausalLM' is not supported (supported: "
        "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel)"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


# --- init_from: hf:PATH ------------------------------------------------------------------------------------


def _hf_dir(tmp_path, config=None):
    hf = tmp_path / "hf"
    hf.mkdir(exist_ok=True)
    (hf / "config.json").write_text(json.dumps(config or {**LLAMA31, "num_hidden_layers": 1}))
    model, _ = model_config_from_hf(json.loads((hf / "config.json").read_text()))
    names = adapter_for("LlamaForCausalLM", model.model_copy(update={"vocab_size": 1}), 128).specs()
    write_sharded(hf, [(n, (1,), 4) for n, _ in names[:2]], lambda n: torch.zeros(1), 10**6, progress=False)
    return hf


def test_fingerprint_follows_the_files(tmp_path):
    hf = _hf_dir(tmp_path)
    first = init_from.fingerprint(hf)
    assert init_from.fingerprint(hf) == first
    (hf / "tokenizer.json").write_text("{}")
    second = init_from.fingerprint(hf)
    (hf / "tokenizer.json").write_text('{"a": 1}')
    assert len({first, second, init_from.fingerprint(hf)}) == 3


def test_fingerprint_of_large_files_uses_the_hub_blob_name(tmp_path, monkeypatch):
    monkeypatch.setattr(init_from, "_SMALL", 0)
    blob = tmp_path / "blobs" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "model.safetensors").symlink_to(blob)
    assert init_from._file_digest(snap / "model.safetensors") == "ab" * 32


def test_check_spec(tmp_path):
    hf = _hf_dir(tmp_path)
    init_from.check_spec(f"hf:{hf}")
    with pytest.raises(UserError, match="init_from: .*no config.json"):
        init_from.check_spec(f"hf:{tmp_path}")
    with pytest.raises(UserError, match="init_from: not a megaflow checkpoint .* nor hf:PATH"):
        init_from.check_spec(str(tmp_path))
    stage = ModelConfig(hidden_size=4096, num_layers=1, num_attention_heads=32, num_query_groups=8,
                        ffn_hidden_size=14336, rotary_base=500000)
    init_from.check_spec(f"hf:{hf}", stage)  # vocabulary, RoPE and epsilon do not shape the weights
    with pytest.raises(UserError) as e:
        init_from.check_spec(f"hf:{hf}", stage.model_copy(update={"hidden_size": 2048, "tie_embeddings": True}))
    assert str(e.value) == (
        f"init_from hf:{hf}: the stage's model differs from the checkpoint's (stage vs checkpoint): "
        "model.hidden_size: 2048 vs 4096; model.kv_channels: 64 vs 128; model.tie_embeddings: True vs False")


def test_resolve_reuses_the_cached_conversion(tmp_path, monkeypatch):
    hf = _hf_dir(tmp_path)
    monkeypatch.setenv("MEGAFLOW_CACHE", str(tmp_path / "cache"))
    assert init_from.resolve_init_from(str(tmp_path / "ckpt")) == tmp_path / "ckpt"
    target = tmp_path / "cache" / "hf" / init_from.fingerprint(hf)
    target.mkdir(parents=True)
    for f in ("megaflow.json", "manifest.json"):
        (target / f).write_text("{}")

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(init_from.subprocess, "run", no_conversion)
    assert init_from.resolve_init_from(f"hf:{hf}") == target


def test_other_ranks_see_rank0s_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "12345")
    status = tmp_path / "x.status"
    status.write_text(json.dumps({"launch": init_from._launch_id(), "error": "init_from: converting d failed: boom"}))
    with pytest.raises(UserError, match="boom"):
        init_from._wait(tmp_path / "x", status, timeout_s=5)
    status.write_text(json.dumps({"launch": "another run", "error": "old"}))
    with pytest.raises(init_from.RunFailed, match="waited"):
        init_from._wait(tmp_path / "x", status, timeout_s=0)


def test_adopt_takes_the_checkpoints_vocabulary(tmp_path):
    model = ModelConfig(hidden_size=64, num_attention_heads=4, ffn_hidden_size=96, vocab_size=151936)
    (tmp_path / "megaflow.json").write_text(json.dumps({"model": model.model_dump(mode="json"), "padded_vocab_size": 151936}))
    cfg = StageConfig(model=model.model_copy(update={"vocab_size": 1000}), data={"seq_length": 64},
                      parallel={"tp": 2}, init_from=str(tmp_path))
    assert init_from.adopt(cfg, tmp_path, 151646, log=lambda *_: None) == 151936 and cfg.model.vocab_size == 151936
    with pytest.raises(UserError, match="the tokenizer has 200000 tokens but the checkpoint's embedding only 151936"):
        init_from.adopt(cfg, tmp_path, 200000)
    notes = []
    cfg.model.rotary_base = 1e6  # a deliberate change (context extension) is announced, not refused
    init_from.adopt(cfg, tmp_path, 1000, log=notes.append)
    assert len(notes) == 1 and "model.rotary_base: 1000000.0 vs 10000.0" in notes[0]


def test_own_inverse_frequencies_match_transformers():
    """Non-default Llama-3.1 factors (and a non-integer RoPE base) get megaflow's own inverse frequencies,
    equal to transformers'."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from megaflow.config.schema import ParallelConfig
    from megaflow.models import gpt
    from megaflow.runtime import distributed as dist

    scaling = {"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 512}
    model = ModelConfig(hidden_size=64, num_layers=1, num_attention_heads=4, ffn_hidden_size=96, vocab_size=128,
                        rotary_base=10000.5, rope_scaling=scaling, max_position_embeddings=2048)
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=2048,
                                  rope_parameters={"rope_type": "llama3", "rope_theta": 10000.5, **scaling})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    dist.setup(seed=1)
    try:
        chunk = gpt.build_gpt_chunks(model, gpt.transformer_config(model, ParallelConfig()), 128)[0]
        default = gpt.build_gpt_chunks(model.model_copy(update={"rope_scaling": RopeScaling(factor=16.0), "rotary_base": 10000.0}),
                                       gpt.transformer_config(model, ParallelConfig()), 128)[0]
    finally:
        dist.teardown()
    assert torch.allclose(chunk.rotary_pos_emb.inv_freq, expected, rtol=1e-6, atol=0)
    assert not torch.allclose(default.rotary_pos_emb.inv_freq, expected, rtol=1e-3)
