"""The docs stay true: every design invariant names tests that exist, and the config-key
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


def test_every_config_field_has_help_and_the_docs_table_is_generated() -> None:
    fields = field_help()
    assert len(fields) > 30 and all(help for _, _, help in fields), [k for k, _, h in fields if not h]
    page = (ROOT / "docs" / "configuration.md").read_text()
    m = re.search(r"<!-- config-keys:start -->\n(.*?)\n<!-- config-keys:end -->", page, flags=re.S)
    assert m, "docs/configuration.md has no config-keys table"
    assert m.group(1) == key_table(), (
        "the key table is stale: paste qolora.config.key_table() into docs/configuration.md"
    )


PAGES = sorted((ROOT / "docs").glob("*.md"))


def _text(path: Path) -> str:
    return path.read_text()


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_readme_is_a_front_door_and_links_every_docs_page() -> None:
    readme = _text(ROOT / "README.md")
    assert len(readme.splitlines()) <= 160, len(readme.splitlines())
    assert len(PAGES) >= 9
    for page in PAGES:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"
    assert "(BENCHMARKS.md)" in readme


def test_every_docs_page_opens_with_what_it_lets_the_reader_do() -> None:
    for page in PAGES:
        if page.name == "design.md":
            continue
        lines = _text(page).splitlines()
        assert lines[0].startswith("# ") and lines[2].startswith("After reading this page you can "), page.name


def test_every_relative_link_in_the_docs_resolves() -> None:
    for path in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *PAGES]:
        for target in re.findall(r"\]\(([^)\s]+)\)", _text(path)):
            if "://" in target:
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists(), f"{path.name}: link to {target}: no such file"
            if anchor and dest.suffix == ".md":
                heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)}
                assert anchor in heads, f"{path.name}: link to {target}: no such heading"


def test_every_command_and_config_key_quoted_in_the_docs_exists() -> None:
    """`qolora <command>` (and `qolora export <kind>`) is one the CLI has; `section.key` is a config key."""
    from qolora.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = set(sub.choices)
    export_kinds = set(next(a for a in sub.choices["export"]._actions if a.dest == "kind").choices)
    import qolora.quant
    import qolora.training

    keys = {k for k, _, _ in field_help()}
    code = {"quant": qolora.quant, "train": qolora.training}
    sections = ("model", "quant", "adapter", "data", "train")
    seen_cmd, seen_key = 0, 0
    for path in [ROOT / "README.md", *PAGES]:
        text = _text(path)
        for cmd, arg in re.findall(r"`qolora ([a-z][a-z-]*)(?: ([a-z]+))?", text) + re.findall(
            r"^qolora ([a-z][a-z-]*)(?: ([a-z]+))?", text, flags=re.M
        ):
            assert cmd in commands, f"{path.name}: qolora {cmd} is no command"
            seen_cmd += 1
            if cmd == "export" and arg:
                assert arg in export_kinds, f"{path.name}: qolora export {arg} is no export kind"
        for key in re.findall(r"`((?:" + "|".join(sections) + r")\.[a-z_]+)(?:[:=][^`]*)?`", text):
            section, name = key.split(".")
            if key not in keys and hasattr(code.get(section), name):
                continue  # qolora.quant.load_base and the like: code, not a config key
            assert key in keys, f"{path.name}: {key} is no config key"
            seen_key += 1
    assert seen_cmd > 20 and seen_key > 20, (seen_cmd, seen_key)


def test_every_example_config_is_complete_and_every_family_has_one(capsys) -> None:
    from .model_matrix import FAMILIES

    configs = sorted((ROOT / "examples").rglob("*.yaml"))
    names = {p.stem for p in (ROOT / "examples" / "models").glob("*.yaml")}
    assert names == {f.name.lower().replace("-", "") for f in FAMILIES}
    assert (ROOT / "examples" / "sft" / "demo.yaml") in configs
    for path in configs:
        assert main(["train", str(path), "--print-config"]) == 0, path
        assert "model: " in capsys.readouterr().out


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
