from emoe.cli import main


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: emoe" in capsys.readouterr().out


def test_every_subcommand_prints_its_help(capsys):
    import argparse

    import pytest

    from emoe.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in commands.choices:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert f"usage: emoe {name}" in capsys.readouterr().out
