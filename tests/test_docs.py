"""The docs stay true: every design invariant names tests that exist, and the README's config-key
table is the one the config fields' help generates."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from qolora.cli import main
from qolora.config import commented_yaml, config_from_dict, field_help, key_table

ROOT = Path(__file__).resolve().parent.parent


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_invariant_names_existing_tests() -> None:
    text = (ROOT / "docs" / "design.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (.+?) \| (.+?) \|$", text, flags=re.M)
    assert [int(n) for n, _, _ in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 10
    for n, _, guards in rows:
        cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", guards)
        assert cited, f"invariant {n} names no test"
        for file, name in cited:
            assert name in _tests_in(ROOT / file), f"invariant {n}: {file}::{name} does not exist"


def test_every_config_field_has_help_and_the_readme_table_is_generated() -> None:
    fields = field_help()
    assert len(fields) > 30 and all(help for _, _, help in fields), [k for k, _, h in fields if not h]
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- config-keys:start -->\n(.*?)\n<!-- config-keys:end -->", readme, flags=re.S)
    assert m, "README.md has no config-keys table"
    assert m.group(1) == key_table(), "README's key table is stale: paste qolora.config.key_table() into it"


def test_the_readme_supported_models_table_is_the_matrix() -> None:
    from .model_matrix import FAMILIES, supported_table

    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- supported-models:start -->\n(.*?)\n<!-- supported-models:end -->", readme, flags=re.S)
    assert m, "README.md has no supported-models table"
    assert m.group(1) == supported_table(), "README's table is stale: paste tests.model_matrix.supported_table()"
    assert len(m.group(1).splitlines()) == len(FAMILIES) + 2


def test_print_config_shows_help_and_round_trips(tmp_path, capsys) -> None:
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: {train: t.jsonl}\n")
    assert main(["train", str(cfg), "train.lr=3e-4", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "  lr: 0.0003  # peak learning rate, or auto" in text
    assert config_from_dict(yaml.safe_load(text)) == config_from_dict(
        yaml.safe_load(cfg.read_text()), ["train.lr=3e-4"]
    )
    assert text == commented_yaml(config_from_dict(yaml.safe_load(text)))


def test_no_import_circle_and_nothing_below_training_reaches_into_it() -> None:
    """File names live in qolora/files.py, format names in qolora/choices.py: adapter_dir and
    training/run_dir no longer import each other, and config reads no training module. (generate.py
    renders prompts through training's own renderer, by design: train and serve render alike.)"""
    from qolora.choices import DATA_FORMATS
    from qolora.training.formats import FORMAT_NAMES

    assert FORMAT_NAMES == DATA_FORMATS
    pkg = ROOT / "qolora"
    for path in [*pkg.glob("*.py"), *pkg.glob("quant/*.py"), *pkg.glob("export/*.py")]:
        if path.name in ("cli.py", "generate.py", "__init__.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and "training" in node.module.split("."):
                raise AssertionError(f"{path.relative_to(ROOT)} imports {node.module}")
