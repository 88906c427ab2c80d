"""`init_from: hf:PATH` end to end: a pretraining stage starts from a Hugging Face directory (converted on
the fly into the cache, its tokenizer taken along), and its final checkpoint converts back to the same
HF model: two training steps at lr 1e-9 leave every tensor within 1e-6 of the original, with the same
config.json (found through the checkpoint's parents)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import run_megaflow
from tests.convert import hf_models

pytestmark = pytest.mark.slow

STAGE = """\
run: {{name: hfinit, dir: {run_dir}, tensorboard: false, progress: false}}
model: {{hidden_size: 64, num_layers: 2, num_attention_heads: 4, num_query_groups: 2, ffn_hidden_size: 96,
        max_position_embeddings: 64, norm_epsilon: 1.0e-6}}
data: {{train: [{{path: {corpus}}}], split: [90, 10, 0], seq_length: 64}}
train: {{steps: 2, micro_batch_size: 4, global_batch_size: 4, lr: 1.0e-9, warmup_steps: 0}}
eval: {{every: 0, iters: 1}}
init_from: hf:{hf}
"""


def test_stage_starts_from_an_hf_directory(tmp_path, corpus):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from megaflow.data.tokenizer import train_tokenizer

    hf = tmp_path / "hf"
    model = AutoModelForCausalLM.from_config(LlamaConfig(**hf_models.SMALL, num_key_value_heads=2,
                                                         max_position_embeddings=64))
    hf_models.randomize(model, seed=5)
    model.save_pretrained(hf, max_shard_size="40KB")
    train_tokenizer([str(corpus)], hf_models.VOCAB, str(tmp_path / "tok"))
    for f in (tmp_path / "tok").iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    stage = tmp_path / "stage.yaml"
    stage.write_text(STAGE.format(run_dir=tmp_path / "run", corpus=corpus, hf=hf))
    env = {"MEGAFLOW_CACHE": str(tmp_path / "cache")}

    proc = run_megaflow("train", "pretrain", "--config", str(stage), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "init_from: converting" in proc.stdout
    cached = list((tmp_path / "cache" / "hf").iterdir())
    ckpt = next(p for p in cached if p.is_dir())
    final = tmp_path / "run" / "pretrain" / "final"
    meta = json.loads((final / "megaflow.json").read_text())
    assert meta["parents"] == [str(ckpt)] and meta["step"] == 2
    assert meta["config"]["tokenizer"]["path"] == str(ckpt / "tokenizer")  # the HF tokenizer came along
    assert meta["padded_vocab_size"] == 384 and meta["model"]["vocab_size"] == hf_models.VOCAB

    back = tmp_path / "back"
    proc = run_megaflow("convert", "megaflow-to-hf", "--ckpt", str(final), "--out", str(back), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((back / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    from safetensors.torch import load_file

    original = {k: v for f in hf.glob("*.safetensors") for k, v in load_file(f).items()}
    trained = {k: v for f in back.glob("*.safetensors") for k, v in load_file(f).items()}
    assert sorted(original) == sorted(trained)
    worst = max((original[k] - trained[k]).abs().max().item() for k in original)
    print(f"largest change after 2 steps at lr 1e-9: {worst:.3g}")
    assert worst < 1e-6
    assert not torch.equal(original["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])  # it did train


SFT_STAGE = """\
run: {{name: hfsft, dir: {run_dir}, tensorboard: false, progress: false}}
data: {{train: [{{path: {data}}}], seq_length: 64, sft: {{valid_fraction: 0.1}}}}
train: {{steps: 3, micro_batch_size: 4, global_batch_size: 4, lr: 1.0e-3, warmup_steps: 0}}
eval: {{every: 0, iters: 1}}
init_from: hf:{hf}
"""


def test_sft_of_a_converted_model_exports_back_to_transformers(tmp_path, corpus):
    """An HF model fine-tuned by `megaflow train sft` (model and tokenizer taken from the HF directory),
    exported with `megaflow convert megaflow-to-hf`, loads in transformers and generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from megaflow.data.tokenizer import train_tokenizer
    from tests.conftest import REPO

    hf = tmp_path / "hf"
    model = AutoModelForCausalLM.from_config(LlamaConfig(**hf_models.SMALL, num_key_value_heads=2,
                                                         max_position_embeddings=64))
    hf_models.randomize(model, seed=6)
    model.save_pretrained(hf, max_shard_size="40KB")
    train_tokenizer([str(corpus)], hf_models.VOCAB, str(tmp_path / "tok"))
    for f in (tmp_path / "tok").iterdir():
        (hf / f.name).write_bytes(f.read_bytes())
    data = tmp_path / "sft.jsonl"
    data.write_text("".join((REPO / "data/sample/sft-words/train.jsonl").read_text().splitlines(True)[:64]))
    stage = tmp_path / "sft.yaml"
    stage.write_text(SFT_STAGE.format(run_dir=tmp_path / "run", data=data, hf=hf))
    env = {"MEGAFLOW_CACHE": str(tmp_path / "cache")}
    proc = run_megaflow("train", "sft", "--config", str(stage), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "run" / "sft" / "final"
    assert json.loads((final / "megaflow.json").read_text())["step"] == 3

    back = tmp_path / "back"
    proc = run_megaflow("convert", "megaflow-to-hf", "--ckpt", str(final), "--out", str(back), "--verify",
                        "--tolerance", "1e-4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(back)
    changed = [n for n, p in tuned.state_dict().items() if not torch.equal(p, model.state_dict()[n])]
    assert changed  # fine-tuning moved the weights
    prompt = tok.apply_chat_template([{"role": "user", "content": "Repeat the words:\nthe\nand"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = tuned.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5 or out[0, -1].item() in (tok.eos_token_id,)
    print("generated:", repr(tok.decode(out[0, prompt["input_ids"].shape[1]:])))
