"""`megaflow plan`: parameter counts against published totals and built megatron models, memory against the
documented formulas (Korthikanti et al. 2022; megatron's distributed-optimizer table), and the compute
budget of GPT-3 175B on 300B tokens."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from megaflow import plan
from megaflow.errors import UserError
from tests.conftest import REPO, run_megaflow

MODELS = REPO / "configs" / "models"
GiB = 2**30


def preset(name: str, *overrides: str, seq: int | None = None):
    return plan.load_plan_config(MODELS / f"{name}.yaml", list(overrides), seq_length=seq)


# ---------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name, published, exact", [
    ("llama3.1-8b", 8.03e9, 8_030_261_248),  # the totals of Meta's released safetensors
    ("llama3.1-70b", 70.6e9, 70_553_706_496),
])
def test_published_llama_parameter_counts(name, published, exact):
    result = plan.make_plan(preset(name, "precision=bf16", seq=8192))
    assert result.params_published == pytest.approx(published, rel=5e-3)
    assert result.params_published == exact
    assert result.params.total == exact  # 128256 is already a multiple of 128: tp=1 pads nothing


def test_vocab_padding_grows_with_tp():
    assert plan.padded_vocab_size(128256, 128, 1) == 128256
    assert plan.padded_vocab_size(128256, 128, 8) == 129024
    result = plan.make_plan(preset("llama3.1-70b", "parallel.tp=8", seq=8192))
    assert result.vocab_size == 129024
    assert result.params.total - result.params_published == 2 * (129024 - 128256) * 8192  # embedding + output


SMALL_GPT2 = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
              "model.ffn_hidden_size=256", "model.vocab_size=1000"]


@pytest.mark.parametrize("name, overrides", [
    ("tiny", []),  # Llama: GQA 8/4, SwiGLU, RMSNorm, untied
    ("gpt2-124m", SMALL_GPT2),  # learned positions, LayerNorm, GELU, biases, tied
    ("tiny", ["model.kv_channels=24", "model.add_qkv_bias=true", "model.normalization=LayerNorm",
              "model.tie_embeddings=true"]),
])
def test_count_matches_the_built_megatron_model(name, overrides):
    from megaflow.models import gpt
    from megaflow.runtime import distributed as dist

    cfg = preset(name, *overrides)
    vocab = plan.padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by)
    dist.setup(seed=1)
    try:
        tcfg = gpt.transformer_config(cfg.model, cfg.parallel)
        built = sum(p.numel() for p in gpt.build_gpt_chunks(cfg.model, tcfg, vocab)[0].parameters())
    finally:
        dist.teardown()
    assert plan.count_parameters(cfg.model, vocab).total == built


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stage_parameters_match_built_stages(tied):
    """The first and last of pp=2 stages, built as megatron builds them (half the layers; embedding on the
    first, final norm and output layer on the last, a tied embedding copied there)."""
    from megatron.core.models.gpt import GPTModel

    from megaflow.models import gpt
    from megaflow.runtime import distributed as dist

    cfg = preset("gpt2-124m", *SMALL_GPT2, "model.num_layers=4", f"model.tie_embeddings={str(tied).lower()}")
    assert cfg.model.position_embedding == "learned"
    vocab = plan.padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by)
    pc = plan.count_parameters(cfg.model, vocab)
    lay = plan.Layout(pp=2)
    half = cfg.model.model_copy(update={"num_layers": 2})
    dist.setup(seed=1)
    try:
        tcfg = gpt.transformer_config(half, cfg.parallel)
        built = []
        for first, last in ((True, False), (False, True)):
            stage = GPTModel(config=tcfg, transformer_layer_spec=gpt.layer_spec(half, tcfg), vocab_size=vocab,
                             max_sequence_length=half.max_position_embeddings, pre_process=first, post_process=last,
                             share_embeddings_and_output_weights=tied, position_embedding_type="learned_absolute")
            built.append(sum(p.numel() for p in stage.parameters()))
    finally:
        dist.teardown()
    assert [plan.params_on_rank(pc, lay, r, tied) for r in (0, 1)] == built


# ---------------------------------------------------------------------------------------------- memory


def gpt3(*overrides: str):
    """GPT-3 175B with dropout, the model of Korthikanti et al.'s formulas."""
    cfg = preset("gpt3-175b", "precision=bf16", "model.hidden_dropout=0.1", "model.attention_dropout=0.1", *overrides)
    return cfg.model


def korthikanti_layout(**kw) -> plan.Layout:
    return plan.Layout(**{"seq_length": 2048, "micro_batch": 1, "flash_attention": False, **kw})


def test_activations_per_layer_follow_korthikanti_et_al():
    """Eq. 1-2 and Table 2 of "Reducing Activation Recomputation in Large Transformer Models", bytes."""
    m = gpt3()
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    sbh = s * b * h
    layer = lambda **kw: plan.layer_activation_bytes(m, korthikanti_layout(**kw))  # noqa: E731
    assert layer() == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert layer(tp=t) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert layer(tp=t, sp=True) == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert layer(tp=t, sp=True, recompute="selective") == pytest.approx(sbh * 34 / t)
    assert layer(tp=t, sp=True, flash_attention=True) == pytest.approx(sbh * 34 / t)  # flash: no s² scores
    assert plan.layer_input_bytes(m, korthikanti_layout(tp=t, sp=True, recompute="full")) == pytest.approx(2 * sbh / t)
    # Without dropout (the Llama presets) the two 1-byte masks and the attention dropout go: 32sbh + 2as²b.
    llama_like = gpt3("model.hidden_dropout=0.0", "model.attention_dropout=0.0")
    assert plan.layer_activation_bytes(llama_like, korthikanti_layout()) == pytest.approx(sbh * (32 + 2 * a * s / h))


def test_pipeline_first_stage_holds_all_layers_interleaved_adds_the_papers_factor():
    m = gpt3()
    base = dict(tp=8, sp=True, recompute="selective", num_microbatches=64)
    layer = plan.layer_activation_bytes(m, korthikanti_layout(**base))
    emb_mask = lambda p: min(p, 64) * 2048 * 12288 / 8  # noqa: E731  embedding dropout mask, 1 byte, per micro-batch
    for pp, vpp in ((1, 1), (8, 1), (16, 1), (8, 3), (16, 2)):
        lay = korthikanti_layout(pp=pp, vpp=vpp, **base)
        first = plan.activation_bytes(m, lay, 0, 51200)
        if pp == 1:
            first -= 2 * 2 * 2048 * 12288 / 8 + 4 * 2048 * 51200 / 8  # the output layer, on the same rank
        factor = 1 + (pp - 1) / (pp * vpp) if vpp > 1 else 1
        assert first - emb_mask(pp) == pytest.approx(96 * layer * factor), (pp, vpp)
    # the last 1F1B stage holds one micro-batch of its layers, plus 4sbh/t·(1 + V/h) for the output layer
    lay = korthikanti_layout(pp=8, **base)
    last = plan.activation_bytes(m, lay, 7, 51200)
    assert last == pytest.approx(12 * layer + 4 * 2048 * 12288 / 8 * (1 + 51200 / 12288))


def test_full_recompute_keeps_layer_inputs_and_one_group():
    m = gpt3("model.hidden_dropout=0.0", "model.attention_dropout=0.0")
    lay = korthikanti_layout(tp=8, sp=True, pp=8, num_microbatches=64, recompute="full", recompute_layers=2)
    full = plan.layer_activation_bytes(m, lay)
    assert full == plan.layer_activation_bytes(m, korthikanti_layout(tp=8, sp=True))  # rebuilt whole, s² scores too
    kept = plan.layer_input_bytes(m, lay)
    assert plan.activation_bytes(m, lay, 0, 51200) == pytest.approx(8 * 6 * kept + 2 * full)
    block = korthikanti_layout(tp=8, sp=True, pp=8, num_microbatches=64, recompute="full",
                               recompute_method="block", recompute_layers=4)
    assert plan.activation_bytes(m, block, 0, 51200) == pytest.approx(8 * (4 * kept + 8 * full) + full)


@pytest.mark.parametrize("precision, per_param", [("bf16", (2, 4, 12)), ("fp8", (2, 4, 12)), ("fp32", (4, 4, 8))])
@pytest.mark.parametrize("dp, distopt", [(1, False), (8, False), (8, True), (64, True)])
def test_model_state_bytes_follow_megatrons_distributed_optimizer_table(precision, per_param, dp, distopt):
    """bf16: 18 bytes per parameter, 6 + 12/dp with the distributed optimizer; fp32: 16, 8 + 8/dp."""
    cfg = preset("llama3.1-8b", f"precision={precision}", f"parallel.distributed_optimizer={str(distopt).lower()}",
                 seq=8192)
    result = plan.make_plan(cfg, gpus=dp)
    (mem,) = result.memory
    w, g, o = per_param
    n = result.params.total
    assert mem.params == n
    assert (mem.weights, mem.grads) == (w * n, g * n)
    assert mem.optimizer == pytest.approx(o * n / (dp if distopt else 1))
    if precision == "bf16":
        assert (mem.weights + mem.grads + mem.optimizer) / n == pytest.approx(6 + 12 / dp if distopt else 18)
    assert mem.total == pytest.approx(mem.weights + mem.grads + mem.optimizer + mem.activations + 3 * GiB)


def test_tensor_and_pipeline_split_the_parameters():
    cfg = preset("llama3.1-70b", "precision=bf16", "parallel.tp=8", "parallel.pp=4", seq=8192)
    result = plan.make_plan(cfg)
    pc = result.params
    first, last = result.memory
    body = 20 * (pc.layer_split // 8 + pc.layer_whole)
    assert first.params == body + pc.word_embedding // 8
    assert last.params == body + pc.output_layer // 8 + pc.final_norm
    assert first.stage == "first" and last.stage == "last"


def test_fits_verdict_and_headroom():
    cfg = preset("llama3.1-8b", "precision=bf16", "parallel.distributed_optimizer=true", "train.micro_batch_size=1",
                 "train.global_batch_size=64", "parallel.recompute=full", seq=8192)
    result = plan.make_plan(cfg, gpus=8)
    need = result.peak.total / GiB
    assert plan.make_plan(cfg, gpus=8, gpu_memory_gib=math.ceil(need)).fits
    assert not plan.make_plan(cfg, gpus=8, gpu_memory_gib=math.floor(need)).fits
    d = plan.make_plan(cfg, gpus=8, gpu_memory_gib=80).to_dict()["memory_gib"]
    assert d["headroom"] == pytest.approx(80 - need, abs=1e-3)


# ---------------------------------------------------------------------------------------------- compute


def test_gpt3_175b_on_300b_tokens():
    """6·N·D = 3.15e23 (Brown et al. 2020 table D.1: 3.14e23); the causal attention term shown apart.
    GPU-days assume a V100's 125 TFLOP/s peak at 22.4% MFU (28 TFLOP/s sustained, the assumption behind
    Lambda Labs' widely quoted "355 V100-years" for GPT-3)."""
    cfg = preset("gpt3-175b", "precision=bf16")  # data.seq_length: the model's 2048
    result = plan.make_plan(cfg, tokens=300e9, peak_tflops=125, mfu=0.224, gpus=1)
    c = result.compute
    assert c.dense_flops == pytest.approx(3.15e23, rel=1e-2)
    assert c.dense_flops == 6 * result.params.total * 300e9
    assert c.attention_flops == 6 * 96 * 2048 * 12288 * 300e9  # 6·L·s·q·D
    assert c.total_flops == c.dense_flops + c.attention_flops
    assert c.gpu_days == pytest.approx(c.total_flops / (125e12 * 0.224) / 86400)
    assert c.dense_flops / (125e12 * 0.224) / 86400 / 365 == pytest.approx(355, rel=1e-2)
    with_cost = plan.make_plan(cfg, tokens=300e9, peak_tflops=125, mfu=0.224, gpus=1024, price=1.5)
    assert with_cost.compute.wall_days == pytest.approx(c.gpu_days / 1024)
    assert with_cost.compute.cost == pytest.approx(c.gpu_hours * 1.5)


def test_default_tokens_and_peak():
    cfg = preset("tiny", "precision=bf16", "train.steps=10", "train.global_batch_size=8", seq=128)
    result = plan.make_plan(cfg)
    assert result.compute.tokens == 10 * 8 * 128
    assert result.compute.peak_tflops == 989
    assert plan.make_plan(preset("tiny", "precision=fp8", seq=128)).compute.peak_tflops == 1979


# ---------------------------------------------------------------------------------------------- inputs


def test_sequence_length_from_the_file_or_the_model():
    assert not plan.sets_seq_length(MODELS / "llama3.1-8b.yaml")  # a model-only preset
    assert plan.sets_seq_length(MODELS / "llama3.1-8b.yaml", ["data.seq_length=4096"])
    assert plan.sets_seq_length(REPO / "configs/stages/pretrain-test.yaml")  # through extends:
    assert preset("llama3.1-8b").data.seq_length == 131072  # then the model's maximum
    assert preset("llama3.1-8b", seq=4096).data.seq_length == 4096
    assert preset("llama3.1-8b", "data.seq_length=2048").data.seq_length == 2048
    assert plan.load_plan_config(REPO / "configs/stages/pretrain-test.yaml").data.seq_length == 64
    with pytest.raises(UserError, match=re.escape("data.seq_length (300) exceeds the model's maximum")):
        preset("tiny", seq=300)
    with pytest.raises(UserError, match="data.seq_length:"):
        preset("tiny", "data.seq_length=abc")
    with pytest.raises(UserError, match="must be divisible by parallel.tp"):  # the schema's rule, at this length
        preset("llama3.1-8b", "parallel.tp=8", "parallel.sp=true", seq=8188)


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus=6), "--gpus 6: world size 6 is not divisible by parallel.tp*pp*cp (2*2*1 = 4)"),
    (dict(mfu=1.5), "--mfu is a fraction"),
    (dict(tokens=-1.0), "--tokens must be a positive finite number"),
    (dict(tokens=float("nan")), "--tokens must be a positive finite number"),
    (dict(price=-1.0), "--price must not be negative"),
])
def test_bad_inputs_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        plan.make_plan(preset("tiny", "parallel.tp=2", "parallel.pp=2", seq=128), **kwargs)


def test_batch_rules_of_megaflow_train_become_a_note():
    cfg = preset("llama3.1-8b", "train.global_batch_size=8", "train.micro_batch_size=4", seq=8192)
    assert any("megaflow train would refuse this layout: train.global_batch_size (8)" in n
               for n in plan.make_plan(cfg, gpus=8).notes)
    assert not plan.make_plan(cfg, gpus=2).notes


def test_plan_imports_neither_torch_nor_megatron():
    code = "import sys, megaflow.plan; sys.exit(any(m in sys.modules for m in ('torch', 'megatron')))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_cli_json_and_errors(tmp_path):
    proc = run_megaflow("plan", str(MODELS / "llama3.1-70b.yaml"), "precision=bf16", "parallel.tp=8", "parallel.pp=4",
                        "--seq-length", "8192", "--gpus", "64", "--tokens", "15e12", "--price", "2", "--json",
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # one JSON object and nothing else on stdout
    assert set(out) == {"model", "layout", "parameters", "memory_gib", "compute", "notes"}
    assert out["parameters"]["published"] == 70_553_706_496
    assert out["layout"]["dp"] == 2 and out["layout"]["gpus"] == 64
    assert {s["stage"] for s in out["memory_gib"]["stages"]} == {"first", "last"}
    assert set(out["compute"]) >= {"flops_6nd", "flops_attention", "flops_total", "gpu_hours", "gpu_days", "cost"}

    proc = run_megaflow("plan", str(MODELS / "llama3.1-8b.yaml"), "parallel.tp=3", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "megaflow: error: parallel.tp (3) must divide model.num_attention_heads (32)"]

    proc = run_megaflow("plan", str(MODELS / "llama3.1-8b.yaml"), "--gpus", "12", "parallel.tp=8", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1

    proc = run_megaflow("plan", str(MODELS / "gpt3-175b.yaml"), "--tokens", "300e9", "--peak-tflops", "125",
                        "--mfu", "0.3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "6·N·D" in proc.stdout and "3.143e+23" in proc.stdout and "fits in 80 GiB" in proc.stdout


def test_an_rl_stage_adds_its_other_models_and_the_rollout_kv_cache():
    """PPO on Llama-3.1-8B, bf16, TP2, 4 GPUs (dp 2): the reference and reward model in bf16 (2 B/param each),
    the critic with its grads and optimizer (18 B/param), and the keys and values of 64 x 8 / 2 rollouts."""
    common = ["precision=bf16", "parallel.tp=2", "rl.prompts_per_step=64", "rl.group_size=8", "rl.max_new_tokens=1024"]
    base = plan.make_plan(preset("llama3.1-8b", *common, seq=2048), gpus=4)
    ppo = plan.make_plan(preset("llama3.1-8b", *common, "stage=ppo", "rl.reward.function=null", "rl.reward.model=rm",
                                seq=2048), gpus=4)
    (a,), (b,) = base.memory, ppo.memory
    n = a.params
    assert b.other_models == pytest.approx(2 * n * 2 + 18 * n)
    assert b.kv_cache == pytest.approx(2 * 32 * (64 * 8 / 2) * 2048 * (8 * 128 / 2) * 2)  # 2 L B s (g d / t) e
    assert b.total == pytest.approx(a.total - a.other_models - a.kv_cache + b.other_models + b.kv_cache)
    assert a.other_models == pytest.approx(2 * n)  # an rl section alone: GRPO's reference only
    text = plan.format_plan(ppo)
    assert "rollout KV cache (RL)" in text and "reference, reward model, critic counted" in text
