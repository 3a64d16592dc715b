"""The command-line dispatcher: every listed command exists and parses its help."""

import importlib

import pytest

from harness.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_module_exists(name):
    module = importlib.import_module(COMMANDS[name][0])

    assert callable(module.add_arguments)
    assert callable(module.run)


def test_parser_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])

    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for name in COMMANDS:
        assert name in help_text


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: brat-harness" in capsys.readouterr().out


def test_user_error_is_one_line(tmp_path, capsys):
    assert main(["table", str(tmp_path)]) == 1

    error = capsys.readouterr().err
    assert "brat-harness table: error: no result records" in error
    assert "Traceback" not in error


def test_empty_results_file_rejected(tmp_path, capsys):
    (tmp_path / "results.jsonl").write_text("")

    assert main(["table", str(tmp_path)]) == 1
    assert "contains no records" in capsys.readouterr().err
