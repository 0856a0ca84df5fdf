"""The README must not drift from the code: its commands exist, CI runs its test command."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoprec.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command():
    assert "make test" in README and "make demo" in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    for target in ("demo", "test", "bench"):
        assert re.search(rf"^{target}:", makefile, re.M), target


def test_every_cli_command_in_the_readme_exists_with_its_flags():
    runner = CliRunner()
    lines = [
        ln
        for ln in README.splitlines()
        if "shoprec " in ln and ln.lstrip().startswith((".venv/bin/shoprec", "shoprec"))
    ]
    assert lines, "README shows no shoprec commands"
    top = runner.invoke(app, ["--help"]).output
    for line in lines:
        cmd = line.split("#")[0].split("shoprec", 1)[1].split()
        while cmd and cmd[0].startswith("--"):  # global options come first, each with its value
            assert cmd[0] in top, f"README uses unknown global option {cmd[0]} in: {line}"
            cmd = cmd[2:]
        path = [cmd[0]]
        if len(cmd) > 1 and not cmd[1].startswith("-"):  # a command group's subcommand (`ab report`, `keys create`)
            sub = runner.invoke(app, [cmd[0], cmd[1], "--help"])
            if sub.exit_code == 0:
                path.append(cmd[1])
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, f"README uses unknown command: {line}"
        for flag in (t.split("=")[0] for t in cmd if t.startswith("--")):
            assert flag in r.output, f"README uses unknown flag {flag} in: {line}"


@pytest.mark.slow  # needs a built shop (the session's tiny API shop, ~1 min to build; shared with the API tests)
def test_the_readme_python_example_runs(api_shop_home, tmp_path, capsys):
    """The README's Python block, run as written against a built shop (its home swapped for the demo's)."""
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1, "README should show exactly one Python example"
    home = shutil.copytree(api_shop_home, tmp_path / "home")  # the shared template stays untouched
    code = blocks[0].replace('"var/demo"', repr(str(home)))
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and [ln.split()[0] for ln in lines] == ["1", "2", "3", "4", "5"]
    assert all(" | " in ln and ln.split(" | ")[1].strip() for ln in lines)  # every pick has a reason
