"""Typed config: YAML, overrides, errors that name the field."""

from __future__ import annotations

import pytest
import yaml

from qolora.config import ConfigError, config_from_dict, dump_config, load_config

BASE = {"model": "m", "data": {"train": "t.jsonl"}}


def test_defaults_and_overrides(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**BASE, "adapter": {"r": 8}}))
    cfg = load_config(p, ["train.lr=1e-4", "adapter.target_modules=[q_proj, v_proj]", "data.packing=true"])
    assert cfg.train.lr == 1e-4 and cfg.adapter.r == 8 and cfg.adapter.alpha == 16.0
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"] and cfg.data.packing is True
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and again.version == 1


@pytest.mark.parametrize(
    "override,msg",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("train.lr=fast", "train.lr: expected float"),
        ("train.batch_size=0", "train.batch_size: must be >= 1"),
        ("adapter.init=corda", "adapter.init: expected one of"),
        ("quant.compute_dtype=float8", "quant.compute_dtype"),
        ("adapter.r=true", "adapter.r: expected int"),
        ("bogus=1", "bogus: unknown key"),
        ("train.lr", "expected key=value"),
    ],
)
def test_bad_values_name_the_field(override: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        config_from_dict(BASE, [override])


def test_required_fields() -> None:
    with pytest.raises(ConfigError, match="data.train: required"):
        config_from_dict({"model": "m"})
    with pytest.raises(ConfigError, match="model: required"):
        config_from_dict({"data": {"train": "x"}})
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent.yaml")


def test_integer_is_accepted_for_float() -> None:
    assert config_from_dict(BASE, ["train.lr=1"]).train.lr == 1.0
