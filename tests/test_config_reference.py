"""scripts/config_reference.py: docs/config.md is what the generator writes from
dlrm/config/sections.py's field docstrings (a stale reference fails here), a field without a
docstring is refused by name, and every key load_config accepts is in the reference."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
import tomllib

import pytest
from helpers import REPO

from dlrm.config import Config, load_config
from dlrm.config import load as config_module
from dlrm.errors import ConfigError

SCRIPT = REPO / "scripts" / "config_reference.py"
_spec = importlib.util.spec_from_file_location("config_reference", SCRIPT)
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


def _rows(text: str) -> dict[str, tuple[str, str, str]]:
    """The reference's rows: key -> (type, default, meaning), ``\\|`` unescaped."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            key, *rest = cells
            rows[key.strip("`")] = tuple(rest)
    return rows


def test_docs_config_md_is_what_the_script_writes():
    expected = ref.render()
    assert (REPO / "docs" / "config.md").read_text() == expected, (
        "docs/config.md is stale: run .venv/bin/python scripts/config_reference.py")


def test_check_exits_0_when_current_and_1_when_stale(tmp_path, monkeypatch):
    out = tmp_path / "config.md"
    monkeypatch.setattr(ref, "OUT", out)
    assert ref.main(["--check"]) == 1  # missing
    out.write_text(ref.render())
    assert ref.main(["--check"]) == 0
    out.write_text(ref.render().replace("Training batch size", "Training batch sizes"))
    assert ref.main(["--check"]) == 1


def test_check_as_a_command_on_this_checkout():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


@dataclasses.dataclass
class Tiny:
    documented: int = 1
    """Has one."""
    bare: str = "x"
    also: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    """Has one too."""


@dataclasses.dataclass
class Whole:
    tiny: Tiny = dataclasses.field(default_factory=Tiny)


def test_a_field_without_a_docstring_is_refused_naming_it(monkeypatch, capsys):
    with pytest.raises(ref.MissingDocstring, match=r"tiny\.bare has no docstring") as e:
        ref.section_rows("tiny", Tiny)
    assert e.value.key == "tiny.bare"
    # The command refuses it too, exit 2 and one line naming the key.
    render = ref.render
    monkeypatch.setattr(ref, "render", lambda: render(Whole))
    assert ref.main(["--check"]) == 2
    assert capsys.readouterr().err.strip() == (
        "config_reference: tiny.bare has no docstring (a string literal right under the field)")


def test_rows_render_types_defaults_as_toml_and_escape_pipes():
    @dataclasses.dataclass
    class Rows:
        maybe: list[str] | None = None
        """Absent | or a list;
        two lines joined."""
        table: dict[str, float] = dataclasses.field(default_factory=lambda: {"a": 0.5})
        """A table."""
        flag: bool = True
        """A flag."""

    rows = _rows("\n".join(ref.section_rows("t", Rows)))
    assert rows == {
        "t.maybe": ("`list[str] | None`", "absent", "Absent | or a list; two lines joined."),
        "t.table": ("`dict[str, float]`", "`{a = 0.5}`", "A table."),
        "t.flag": ("`bool`", "`true`", "A flag."),
    }


def test_every_key_load_config_accepts_is_in_the_reference(tmp_path):
    rows = _rows((REPO / "docs" / "config.md").read_text())
    config = Config()
    # What load_config's _set accepts: each section's fields, by their resolved types.
    accepted = {f"{s.name}.{name}" for s in dataclasses.fields(config)
                for name in config_module._field_types(getattr(config, s.name))}
    assert accepted == set(rows)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, ["--data.not_in_the_reference=1"])
    # Each documented default, written back as TOML, loads to the default itself.
    tables: dict[str, list[str]] = {}
    for key, (_, default, meaning) in rows.items():
        assert meaning, key
        section, name = key.split(".")
        if default != "absent":
            tables.setdefault(section, []).append(f"{name} = {default.strip('`')}")
    recipe = tmp_path / "defaults.toml"
    recipe.write_text("".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in tables.items()))
    assert tomllib.loads(recipe.read_text())
    loaded = load_config(recipe, ["--data.path=somewhere"])
    expected = Config()
    expected.data.path = "somewhere"
    assert loaded == expected
