"""The core CLI: listing commands, help with examples, and a real subprocess run."""

import subprocess
import sys

from click.testing import CliRunner

import diffsamp
from diffsamp.cli import main


def test_samplers_lists_every_registered_sampler():
    res = CliRunner().invoke(main, ["samplers"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == diffsamp.available_samplers()
    assert any(ln.startswith("ddim") and "eta" in ln for ln in lines)


def test_schedules_lists_every_schedule():
    res = CliRunner().invoke(main, ["schedules"])
    assert res.exit_code == 0
    assert [ln.split()[0] for ln in res.output.strip().splitlines()] == diffsamp.available_schedules()


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    res = runner.invoke(main, ["--help"])
    assert res.exit_code == 0 and "Examples" in res.output

    def walk(group, path):
        for name, cmd in group.commands.items():
            out = runner.invoke(main, path + [name, "--help"])
            assert out.exit_code == 0, (path, name, out.output)
            assert "Example" in out.output, f"`diffsamp {' '.join(path + [name])} --help` shows no example"
            if hasattr(cmd, "commands"):
                walk(cmd, path + [name])

    walk(main, [])


def test_subprocess_entry_point():
    out = subprocess.run([sys.executable, "-m", "diffsamp.cli", "samplers"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "heun" in out.stdout
