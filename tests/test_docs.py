"""The documentation stays true: every TOML example in README.md and docs/ is a config that
`jitlaunch check --config-only` accepts (an example that shows one table is checked inside a
minimal config), the README stays short, and every relative link points at a file."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: What an example that shows only some tables is checked inside.
MINIMAL = '[dns]\nzones = ["apps.example.org"]\n'


def _examples() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in re.finditer(r"```toml\n(.*?)```", text, re.S):
            line = text[:m.start()].count("\n") + 1
            out.append((f"{path.relative_to(ROOT)}:{line}", m.group(1)))
    return out


EXAMPLES = _examples()


def test_there_are_examples_to_check() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize(("where", "example"), EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_each_toml_example_is_a_valid_config(where: str, example: str, tmp_path: Path) -> None:
    text = example if re.search(r"^\[dns\]", example, re.M) else MINIMAL + example
    path = tmp_path / "example.toml"
    path.write_text(text)
    out = subprocess.run([sys.executable, "-m", "jitlaunch.cli", "check", "--config-only",
                          str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{where}:\n{example}\n{out.stderr}"


def test_the_readme_is_short_and_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    first = re.search(r"```sh\n(.*?)```", text, re.S)
    assert first is not None
    commands = [line.split("#")[0].strip() for line in first.group(1).splitlines()]
    assert commands == ["scripts/demo", "scripts/test"]


@pytest.mark.parametrize("path", DOCS, ids=[str(p.relative_to(ROOT)) for p in DOCS])
def test_relative_links_point_at_files(path: Path) -> None:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: {target}"
