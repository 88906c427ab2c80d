"""Config loading: extends, presets, overrides and one-line validation errors."""

from __future__ import annotations

import pytest

from megaflow.config import ConfigError, load_config
from tests.conftest import REPO

TINY = REPO / "configs" / "stages" / "pretrain-tiny.yaml"


def test_extends_and_overrides():
    cfg = load_config(TINY, ["train.steps=50", "parallel.tp=2", "train.lr=1e-3"])
    assert cfg.model.hidden_size == 128 and cfg.model.num_query_groups == 4  # from ../models/tiny.yaml
    assert cfg.train.steps == 50 and cfg.parallel.tp == 2 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.data.train[0].path == "data/sample/tinyshakespeare.txt"


def test_preset_by_name(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("model: {preset: gpt2-124m, num_layers: 2}\ndata: {seq_length: 128}\n")
    cfg = load_config(f)
    assert cfg.model.position_embedding == "learned" and cfg.model.tie_embeddings
    assert cfg.model.num_layers == 2  # the file's own value wins over the preset


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=5"], "train.stepz: unknown config key"),
        (["train.steps=abc"], "train.steps:"),
        (["parallel.tp=3"], "parallel.tp (3) must divide model.num_attention_heads (8)"),
        (["data.seq_length=512"], "data.seq_length (512) exceeds the model's maximum"),
        (["model.preset=nosuch"], "model.preset: unknown preset 'nosuch'"),
        (["parallel.sp=true"], "parallel.sp=true requires parallel.tp > 1"),
        (["train.global_batch_size=20", "train.micro_batch_size=16"], "train.global_batch_size (20) must be a multiple"),
        (["precision=fp16"], "precision:"),
        (["justaword"], "expected key=value"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    text = str(e.value)
    assert message in text and "\n" not in text


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)
    missing_parent = tmp_path / "child.yaml"
    missing_parent.write_text("extends: parent.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*parent.yaml"):
        load_config(missing_parent)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.vpp=2"], "parallel.vpp > 1 requires parallel.pp > 1"),
        (["parallel.overlap_param_gather=true"], "overlap_param_gather=true requires parallel.distributed_optimizer"),
        (["parallel.tp=2", "parallel.sp=true", "data.seq_length=255"], "data.seq_length (255) must be divisible by parallel.tp (2)"),
        (["parallel.cp=2", "data.seq_length=250"], "data.seq_length (250) must be divisible by 4"),
        (["parallel.pp=3"], "parallel.pp*vpp (3) must divide model.num_layers (4)"),
        (["parallel.tp=8"], "parallel.tp (8) must divide model.num_query_groups (4)"),
        (["parallel.recompute=partial"], "parallel.recompute:"),
    ],
)
def test_invalid_layout_is_one_clear_line(overrides, message):
    test_bad_config_is_one_clear_line(overrides, message)


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp*pp*cp (2*1*1 = 2)"),
        (["parallel.tp=2", "parallel.dp=4"], 4, "parallel.dp=4 does not match the world size: 4 / (tp*pp*cp = 2) = 2"),
        (["train.global_batch_size=16"], 32, "must be a multiple of train.micro_batch_size * data-parallel size (16 * 32 = 512)"),
        (["parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=48"], 2,
         "needs the number of micro-batches per step (global_batch_size / (micro_batch_size * dp) = 3) to be a multiple of parallel.pp (2)"),
    ],
)
def test_layout_against_world_size(overrides, world, message):
    cfg = load_config(TINY, overrides)
    with pytest.raises(ValueError) as e:
        cfg.check_layout(world)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_valid_layouts_give_their_data_parallel_size():
    assert load_config(TINY, ["parallel.tp=2", "parallel.pp=2", "train.global_batch_size=32"]).check_layout(8) == 2
    assert load_config(TINY, ["parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=32"]).check_layout(2) == 1
    assert load_config(TINY, ["parallel.dp=2", "parallel.tp=2", "train.global_batch_size=32"]).check_layout(4) == 2


def test_config_files_that_are_not_utf8_or_extend_a_number(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=r"binary.yaml: not UTF-8 text \(byte 1\)"):
        load_config(binary)
    number = tmp_path / "number.yaml"
    number.write_text("extends: 42\n")
    with pytest.raises(ConfigError, match="extends: expected a file name or a list of them, got 42"):
        load_config(number)
    with pytest.raises(ConfigError, match="config is a directory, not a file"):
        load_config(tmp_path)
