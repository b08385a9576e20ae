"""The CLI surface: subcommands, --help, --version, and one-line user errors (exit 2)."""

from conftest import run_cli

SUBCOMMANDS = ["merge", "search", "soup", "eval", "export", "report", "demo"]


def test_help_lists_every_subcommand():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in SUBCOMMANDS:
        assert name in out.stdout


def test_each_subcommand_has_help():
    for name in SUBCOMMANDS:
        out = run_cli(name, "--help")
        assert out.returncode == 0, (name, out.stderr)
        assert "usage: mergesearch " + name in out.stdout


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("mergesearch ")


def test_no_command_is_a_user_error():
    assert run_cli().returncode == 2
