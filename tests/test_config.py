"""Config loading, overrides, validation, to_toml, and the CLI's early config / data errors."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import torch.distributed as dist

from dlrm import cli
from dlrm.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    ShardingConfig,
    TrainConfig,
    load_config,
    to_toml,
)
from dlrm.errors import ConfigError

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"


@pytest.fixture
def write_toml(tmp_path):
    def write(text: str, name: str = "recipe.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def test_tiny_recipe_sets_every_key_in_the_file():
    config, defaults = load_config(TINY), Config()
    doc = tomllib.loads(TINY.read_text())
    assert doc["data"]["path"] and doc["model"]["embedding_dim"] != defaults.model.embedding_dim
    for section in dataclasses.fields(Config):
        table = doc.get(section.name, {})
        for f in dataclasses.fields(getattr(config, section.name)):
            key, got = f"{section.name}.{f.name}", getattr(getattr(config, section.name), f.name)
            # Keys the file leaves out keep their defaults.
            default = getattr(getattr(defaults, section.name), f.name)
            assert got == table.get(f.name, default), key
            assert type(got) is type(default), key  # e.g. a float field stays a float


def test_overrides_apply_after_the_file():
    config = load_config(TINY, [
        "--model.embedding_dim=32",
        "--model.dense_arch_layer_sizes=[64,32]",
        "--data.path=some/dir",
        "--optim.dense_lr=1",
        '--sharding.sharding_types=["row_wise", "table_wise"]',
    ])
    assert config.model.embedding_dim == 32
    assert config.model.dense_arch_layer_sizes == [64, 32]
    assert config.data.path == "some/dir"
    assert config.optim.dense_lr == 1.0 and isinstance(config.optim.dense_lr, float)
    assert config.sharding.sharding_types == ["row_wise", "table_wise"]
    assert config.data.batch_size == 512  # from the file, untouched


def test_string_override_is_taken_raw():
    # Values that would parse as TOML numbers or booleans stay strings for str fields.
    assert load_config(TINY, ["--data.path=123"]).data.path == "123"
    assert load_config(TINY, ["--data.path=a b=c"]).data.path == "a b=c"


@pytest.mark.parametrize(
    "text, key",
    [
        ("[model]\nembeding_dim = 16\n", "model.embeding_dim"),
        ("[modle]\nembedding_dim = 16\n", "modle.embedding_dim"),
        ("[data]\npath = 'x'\n[train]\nepoch = 2\n", "train.epoch"),
        ("path = 'x'\n", "path"),
        ("[model.extra]\nx = 1\n", "model.extra"),
    ],
)
def test_unknown_key_in_file_names_file_and_key(write_toml, text, key):
    path = write_toml(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value)
    assert f"'{key}'" in str(e.value)


def test_wrong_type_in_file_names_file_and_key(write_toml):
    path = write_toml("[data]\npath = 'x'\nbatch_size = '512'\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_missing_and_invalid_files(tmp_path, write_toml):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(missing)
    broken = write_toml("[data\npath = 'x'\n", "broken.toml")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(broken)


@pytest.mark.parametrize(
    "override, key",
    [
        ("--model.embeding_dim=16", "model.embeding_dim"),
        ("--modle.embedding_dim=16", "modle.embedding_dim"),
        ("--data=1", "data"),
        ("--data.batch_size=abc", "data.batch_size"),
        ("--data.batch_size=1.5", "data.batch_size"),
        ("--data.batch_size=true", "data.batch_size"),
        ("--train.epochs=true", "train.epochs"),
        ("--optim.dense_lr=fast", "optim.dense_lr"),
        ("--model.dense_arch_layer_sizes=16", "model.dense_arch_layer_sizes"),
        ("--model.dense_arch_layer_sizes=[64, 1.5]", "model.dense_arch_layer_sizes[1]"),
        ("--data.train_sources=day_0", "data.train_sources"),
    ],
)
def test_bad_override_names_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert key in str(e.value)


@pytest.mark.parametrize("override", ["model.embedding_dim=16", "--model.embedding_dim"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match="--section.key=value"):
        load_config(TINY, [override])


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["--model.embedding_dim=48"], "model.dense_arch_layer_sizes"),
        (["--model.dense_arch_layer_sizes=[]"], "model.dense_arch_layer_sizes"),
        (["--model.over_arch_layer_sizes=[64, 2]"], "model.over_arch_layer_sizes"),
        (["--optim.embedding_optimizer=lamb"], "optim.embedding_optimizer"),
        (["--model.interaction=transformer"], "model.interaction"),
        (["--model.dcn_low_rank_dim=0"], "model.dcn_low_rank_dim"),
        (["--model.embedding_dtype=int8"], "model.embedding_dtype"),
        (["--model.num_embeddings_per_feature=[10, 0]"], "model.num_embeddings_per_feature"),
        (['--sharding.table_sharding_types={C1=["data_parallel"]}'],
         "sharding.table_sharding_types.C1"),
        (["--sharding.allreduce_precision=fp8"], "sharding.allreduce_precision"),
        (["--sharding.hbm_gib=-1"], "sharding.hbm_gib"),
        (["--optim.warmup_steps=10", "--optim.decay_start=5", "--optim.decay_steps=5"],
         "optim.decay_start"),
        (["--train.target_auc=1.5"], "train.target_auc"),
        (["--train.autocast=fp8"], "train.autocast"),
        (["--optim.dense_optimizer=rowwise_adagrad"], "optim.dense_optimizer"),
        (['--sharding.sharding_types=["diagonal"]'], "sharding.sharding_types"),
        (["--data.path="], "data.path"),
        (["--data.batch_size=0"], "data.batch_size"),
        (["--train.epochs=0"], "train.epochs"),
        (["--train.device=tpu"], "train.device"),
        (["--train.log_every=0"], "train.log_every"),
        (["--eval.limit_batches=-1"], "eval.limit_batches"),
        (['--sharding.compute_kernels=["dense"]'], "sharding.compute_kernels"),
        (["--sharding.column_shard_dim=-4"], "sharding.column_shard_dim"),
        (["--train.collective_timeout_s=0"], "train.collective_timeout_s"),
    ],
)
def test_inconsistent_value_names_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, overrides)
    assert str(e.value).startswith(f"{key}:")


def test_table_types_must_be_a_table_of_lists():
    with pytest.raises(ConfigError, match=r"sharding\.table_sharding_types: expected a table"):
        load_config(TINY, ['--sharding.table_sharding_types=["row_wise"]'])
    config = load_config(TINY, ['--sharding.table_sharding_types={C3 = ["column_wise"]}'])
    assert config.sharding.table_sharding_types == {"C3": ["column_wise"]}


@pytest.mark.parametrize("recipe", sorted((TINY.parent).glob("*.toml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_round_trips(recipe, tmp_path):
    config = load_config(recipe)
    again = tmp_path / "again.toml"
    again.write_text(to_toml(config))
    assert load_config(again) == config


def test_criteo_1tb_recipe_is_the_published_setting():
    m, o = load_config(TINY.parent / "criteo_1tb.toml").model, \
        load_config(TINY.parent / "criteo_1tb.toml").optim
    assert (m.embedding_dim, m.dense_arch_layer_sizes, m.over_arch_layer_sizes) == \
        (128, [512, 256, 128], [1024, 1024, 512, 256, 1])
    assert max(m.num_embeddings_per_feature) == 40_000_000 and m.interaction == "dot"
    assert (o.embedding_optimizer, o.dense_lr) == ("adagrad", 0.006)
    assert o.embedding_lr == 0.1  # tuned on 1TB-shaped synthetic data (see the recipe)
    dcn = load_config(TINY.parent / "criteo_1tb_dcnv2.toml")
    assert (dcn.model.interaction, dcn.model.dcn_num_layers, dcn.model.dcn_low_rank_dim) == \
        ("dcn", 3, 512)
    assert dcn.train.target_auc == 0.80275 and len(dcn.data.multi_hot_sizes) == 26


def test_inconsistent_value_in_file(write_toml):
    path = write_toml("[data]\npath = 'x'\n[model]\nembedding_dim = 8\n"
                      "dense_arch_layer_sizes = [16, 4]\n")
    with pytest.raises(ConfigError, match=r"model\.dense_arch_layer_sizes"):
        load_config(path)


def test_to_toml_round_trip(tmp_path):
    config = load_config(TINY, [
        '--data.path=C:\\data\\"odd" dir',
        '--data.val_sources=["day_1[0:0.5]"]',
        '--sharding.sharding_types=["row_wise"]',
        "--optim.eps=1e-10",
        "--train.eval_every=7",
    ])
    text = to_toml(config)
    path = tmp_path / "config.toml"
    path.write_text(text)
    again = load_config(path)
    assert again == config
    assert dataclasses.asdict(again)["data"]["path"] == 'C:\\data\\"odd" dir'
    assert to_toml(again) == text
    # Every field is written, so the file alone reproduces the run; an absent split (None:
    # the default split) is left out, as TOML has no null, and reads back as absent.
    fields = {f"{s.name}.{g.name}" for s in dataclasses.fields(Config)
              for g in dataclasses.fields(getattr(config, s.name))
              if getattr(getattr(config, s.name), g.name) is not None}
    assert fields >= {"data.val_sources", "data.allow_overlap", "train.keep_best"}
    assert "data.train_sources" not in fields
    doc = tomllib.loads(text)
    assert {f"{s}.{k}" for s, table in doc.items() for k in table} == fields


# ----------------------------------------------------------------------------- CLI


def test_cli_train_bad_config_exits_2(write_toml, capsys):
    path = write_toml("[model]\nembeding_dim = 16\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.embeding_dim" in err and str(path) in err


def test_cli_train_bad_override_exits_2(capsys):
    assert cli.main(["train", "--config", str(TINY), "--data.batch_size=abc"]) == 2
    assert "data.batch_size" in capsys.readouterr().err


def test_cli_train_missing_dataset_exits_2_before_any_process_group(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "dataset"
    assert cli.main(["train", "--config", str(TINY), f"--data.path={missing}"]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and str(missing) in err
    assert not dist.is_initialized()


def test_cli_train_directory_without_manifest_exits_2(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert cli.main(["train", "--config", str(TINY), f"--data.path={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and "manifest.json" in err
    assert not dist.is_initialized()


def test_empty_unknown_section_is_an_error(write_toml):
    path = write_toml("[data]\npath = 'x'\n[modle]\n")
    with pytest.raises(ConfigError, match=r"unknown key 'modle'") as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_kernel_and_column_shard_constraints_reach_every_table():
    from dlrm.train.sharding import table_constraints

    config = load_config(TINY, ['--sharding.compute_kernels=["fused_uvm_caching"]',
                                "--sharding.column_shard_dim=32"])
    constraints = table_constraints(config.sharding, ["t_C1", "t_C2"])
    assert {t: (c.compute_kernels, c.min_partition) for t, c in constraints.items()} == {
        "t_C1": (["fused_uvm_caching"], 32), "t_C2": (["fused_uvm_caching"], 32)}
    default = table_constraints(load_config(TINY).sharding, ["t_C1"])["t_C1"]
    assert (default.compute_kernels, default.min_partition) == (None, None)



@pytest.mark.parametrize("section, key", [
    (DataConfig(path="d", batch_size=0), "data.batch_size"),
    (ModelConfig(dense_arch_layer_sizes=[16]), "model.dense_arch_layer_sizes"),
    (ShardingConfig(compute_kernels=["dense"]), "sharding.compute_kernels"),
    (OptimConfig(decay_power=0.0), "optim.decay_power"),
    (TrainConfig(log_every=0), "train.log_every"),
    (EvalConfig(limit_val_batches=-1), "eval.limit_val_batches"),
])
def test_each_section_checks_its_own_values(section, key):
    """A section validates itself, alone (as torchtitan's config sections do); the whole
    config refuses the same value naming the same key; with that one field at its default
    the section is valid."""
    pattern = "^" + re.escape(key) + ": "
    with pytest.raises(ConfigError, match=pattern):
        section.validate()
    name, field = key.split(".")
    with pytest.raises(ConfigError, match=pattern):
        Config(**{"data": DataConfig(path="d"), name: section}).validate()
    dataclasses.replace(section, **{field: getattr(type(section)(), field)}).validate()
