"""HF <-> megaflow conversion end to end, for every supported architecture (tiny random models, never
downloaded): megaflow's logits equal transformers' to 1e-4 (fp32, several sequences), HF -> megaflow -> HF
gives back every tensor bit for bit with the same config.json, and the checkpoint loads into TP=2 and
gives the same logits. Three processes: this one (transformers), a worker converting everything both
ways, and a 2-rank torchrun. Worker: tests/convert/worker.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_python
from tests.convert import hf_models

pytestmark = pytest.mark.slow

WORKER = REPO / "tests" / "convert" / "worker.py"
NAMES = list(hf_models.configs())
TOL = 1e-4


def _launch(out: Path, nproc: int | None, *args: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    launcher = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = run_python(*launcher, str(WORKER), "--out", str(out), *args, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus):
    """Build every HF model and its reference logits here, then convert in the worker (one process) and
    load into TP=2 (two ranks)."""
    from transformers import AutoModelForCausalLM

    from megaflow.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("convert")
    tok_dir = out / "tokenizer-src"
    train_tokenizer([str(corpus)], hf_models.VOCAB, str(tok_dir))
    refs, controls = {}, {}
    for i, name in enumerate(NAMES):
        model = hf_models.build(name, out / name, tok_dir if name != "gpt2" else None, seed=i)
        length = 16 if name == "mistral_window" else 48  # the window model is converted with 16 positions
        g = torch.Generator().manual_seed(100 + i)
        tokens = torch.randint(0, model.config.vocab_size, (4, length), generator=g)
        torch.save(tokens, out / f"{name}.tokens.pt")
        loaded = AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32, local_files_only=True).eval()
        refs[name] = hf_models.logits(loaded, tokens)
        if name in ("llama31", "llama31_custom"):  # controls: the same weights without (or with other) scaling
            rope = dict(model.config.rope_parameters)
            controls[name] = {"no scaling": hf_models.logits(hf_models.variant(
                loaded, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]}), tokens)}
            if name == "llama31_custom":
                controls[name]["megatron's fixed factors"] = hf_models.logits(hf_models.variant(
                    loaded, rope_parameters={**hf_models.LLAMA3, "factor": rope["factor"], "rope_theta": rope["rope_theta"]}), tokens)
    _launch(out, None, "--models", *NAMES)
    _launch(out, 2, "--tp2", "--models", *NAMES)
    results = json.loads((out / "results-one.json").read_text())
    results["tp2"] = json.loads((out / "results-tp2.json").read_text())
    return {"out": out, "refs": refs, "controls": controls, "results": results, "tokenizer": tok_dir}


@pytest.mark.parametrize("name", NAMES)
def test_megaflow_logits_equal_transformers(run, name):
    ref = run["refs"][name]
    ours = torch.load(run["out"] / f"{name}.mf-logits.pt")
    vocab = ref.shape[-1]
    diff = (ours[..., :vocab] - ref).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.3g} over {tuple(ref.shape)}; verify reported "
          f"{run['results'][name]['to_megaflow']['max_abs_logit_diff']:.3g} / {run['results'][name]['to_hf']['max_abs_logit_diff']:.3g}")
    assert ref.abs().max() > 0.5  # logits of a model whose weights matter
    assert diff <= TOL
    assert run["results"][name]["to_megaflow"]["max_abs_logit_diff"] <= TOL
    assert run["results"][name]["to_hf"]["max_abs_logit_diff"] <= TOL
    assert run["results"][name]["padded_rows_zero"]


@pytest.mark.parametrize("name", ["llama31", "llama31_custom"])
def test_rope_scaling_is_really_tested(run, name):
    """The sequences are long enough that dropping the scaling (or, for non-default low/high factors,
    using megatron's fixed ones) would fail the 1e-4 comparison by far."""
    for what, other in run["controls"][name].items():
        diff = (other - run["refs"][name]).abs().max().item()
        print(f"{name} vs {what}: {diff:.3g}")
        assert diff > 100 * TOL


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bitwise_with_equal_config(run, name):
    src, back = run["out"] / name, run["out"] / f"{name}.hf"
    a, b = _safetensors(src), _safetensors(back)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key
    assert json.loads((src / "config.json").read_text()) == json.loads((back / "config.json").read_text())
    assert (src / "config.json").read_text() == (back / "config.json").read_text()
    assert (src / "generation_config.json").read_text() == (back / "generation_config.json").read_text()
    # sharded with an index that names every tensor and only existing files
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) > 1
    assert all((back / f).is_file() for f in index["weight_map"].values())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_tokenizer_files_are_carried_both_ways(run, name):
    from megaflow.data.tokenizer import Tokenizer

    src, ckpt, back = run["out"] / name, run["out"] / f"{name}.mf", run["out"] / f"{name}.hf"
    files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    for f in files:
        assert (ckpt / "tokenizer" / f).read_bytes() == (src / f).read_bytes()
        assert (back / f).read_bytes() == (src / f).read_bytes()
    tok = Tokenizer.load(ckpt / "tokenizer")
    assert tok.vocab_size == hf_models.VOCAB and tok.decode(tok.encode("Hello there")) == "Hello there"


def test_checkpoint_metadata(run):
    from megaflow.models import manifest

    meta = json.loads((run["out"] / "gpt2.mf" / "megaflow.json").read_text())
    assert meta["kind"] == "final" and meta["padded_vocab_size"] == 384  # 257 padded to a multiple of 128
    assert meta["model"]["activation"] == "gelu_tanh" and meta["model"]["position_embedding"] == "learned"
    assert meta["model"]["tie_embeddings"] and meta["hf"]["architecture"] == "GPT2LMHeadModel"
    assert "tokenizer" not in meta and not (run["out"] / "gpt2.mf" / "tokenizer").exists()  # it came without one
    assert manifest.verify(run["out"] / "gpt2.mf") is None
    qwen = json.loads((run["out"] / "qwen2.mf" / "megaflow.json").read_text())
    assert qwen["model"]["add_qkv_bias"] and qwen["hf"]["dtype"] == "bfloat16" and qwen["model"]["num_query_groups"] == 2
    custom = json.loads((run["out"] / "llama31_custom.mf" / "megaflow.json").read_text())["model"]["rope_scaling"]
    assert (custom["factor"], custom["low_freq_factor"], custom["high_freq_factor"],
            custom["original_max_position_embeddings"]) == (16.0, 2.0, 8.0, 512)
    mistral = json.loads((run["out"] / "mistral.mf" / "megaflow.json").read_text())["model"]
    assert mistral["kv_channels"] == 32
    window = run["results"]["mistral_window"]["to_megaflow"]
    assert json.loads((run["out"] / "mistral_window.mf" / "megaflow.json").read_text())["model"]["max_position_embeddings"] == 16
    assert any("sliding_window=16" in n for n in window["notes"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", NAMES)
def test_tp2_loads_and_gives_the_same_logits(run, name):
    assert run["results"]["tp2"][name]["tp"] == 2
    ref = run["refs"][name]
    ours = torch.load(run["out"] / f"{name}.tp2-logits.pt")
    diff = (ours[..., : ref.shape[-1]] - ref).abs().max().item()
    print(f"{name} TP2: max |logit diff| {diff:.3g}")
    assert diff <= TOL


def test_cli_and_verify_gate(run):
    cli = run["results"]["cli"]
    assert cli["rc"] == 0
    summary = json.loads(cli["stdout"])
    assert summary["architecture"] == "GPT2LMHeadModel" and summary["max_abs_logit_diff"] <= TOL
    gate = run["results"]["gate"]
    for direction in ("to_megaflow", "to_hf"):
        assert "above the tolerance" in gate[direction], gate[direction]
    assert gate["left_behind"] == []  # nothing half-written, no .tmp either


def test_a_megaflow_model_exports_as_llama(run):
    """A checkpoint that never was an HF one: LlamaForCausalLM, its token ids from megaflow's tokenizer,
    bfloat16 on request (verified against the megatron model rounded the same way)."""
    result = run["results"]["native"]
    assert result["architecture"] == "LlamaForCausalLM" and not result["from_hf_config"]
    assert result["max_abs_logit_diff"] <= TOL
    back = run["out"] / "native.hf"
    config = json.loads((back / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (0, 1, 2)
    assert config["dtype"] == "bfloat16" and config["num_key_value_heads"] == 2 and config["vocab_size"] == 300
    tensors = _safetensors(back)
    assert tensors["model.embed_tokens.weight"].shape == (300, 64)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert (back / "tokenizer.json").read_bytes() == (run["tokenizer"] / "tokenizer.json").read_bytes()
