import subprocess
import sys

from s2i.cli import COMMANDS, main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "s2i", "--help"], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_each_subcommand_has_help():
    for name in COMMANDS:
        r = subprocess.run([sys.executable, "-m", "s2i", name, "--help"], capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
        assert "usage" in r.stdout.lower()


def test_unbuilt_subcommand_exits_nonzero_with_one_line(monkeypatch, capsys):
    monkeypatch.setitem(COMMANDS, "bogus", ("s2i.does_not_exist", "nothing"))
    assert main(["bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not built yet" in err
