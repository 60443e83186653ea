"""cli.py: flags derived from the dataclasses, config precedence, exit codes, a torch-free --help."""

from __future__ import annotations

import subprocess
import sys

from pastiche.cli import COMMANDS, build_parser, main, stage_config
from pastiche.config import PrepareConfig


def parsed(*argv: str) -> dict:
    args = vars(build_parser().parse_args(list(argv)))
    args.pop("command")
    return args


def test_default_then_yaml_then_flag(tmp_path):
    config = tmp_path / "pastiche.yaml"
    config.write_text("prepare:\n  seed: 5\n  max_tokens: 300\n  author: Ada\ntrain:\n  epochs: 9\n")
    cfg = stage_config("prepare", parsed("prepare", "book.csv", "--out", "data", "--config", str(config),
                                         "--seed", "7", "--no-continuation"))
    assert isinstance(cfg, PrepareConfig)
    assert (cfg.source, cfg.out, cfg.seed, cfg.max_tokens, cfg.author) == ("book.csv", "data", 7, 300, "Ada")
    assert (cfg.continuation, cfg.eval_fraction, cfg.base) == (False, 0.1, "embedded")  # dataclass defaults
    assert stage_config("prepare", parsed("prepare", "book.csv", "--out", "data")).seed == 1234


def test_unknown_yaml_key_exits_2(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("prepare:\n  max_token: 300\n")
    assert main(["prepare", "book.csv", "--out", str(tmp_path / "out"), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pastiche prepare: error: unknown option 'max_token' for PrepareConfig; known: author, base,")
    assert not (tmp_path / "out").exists()


def test_bad_flag_value_exits_2_naming_the_flag(capsys):
    assert main(["prepare", "book.csv", "--out", "data", "--max-tokens", "10"]) == 2
    assert capsys.readouterr().err == "pastiche prepare: error: --max-tokens must be at least 32 (got 10).\n"
    assert main(["prepare", "book.csv", "--out", "data", "--eval-fraction", "0.5", "--test-fraction", "0.5"]) == 2
    assert capsys.readouterr().err == ("pastiche prepare: error: --test-fraction must be small enough that "
                                       "eval + test fractions leave pieces to train on.\n")


def test_missing_config_file_exits_2(tmp_path, capsys):
    assert main(["prepare", "book.csv", "--out", "data", "--config", str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err == f"pastiche prepare: error: --config: {tmp_path / 'none.yaml'} is not a file.\n"


HELP_PROBE = """
import sys
from pastiche.cli import main
for argv in (["--help"], ["prepare", "--help"]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, exc.code
print(sorted(m for m in ("torch", "transformers", "datasets", "matplotlib", "pastiche.prepare") if m in sys.modules))
"""


def test_help_does_not_import_heavy_libraries():
    result = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    for command in COMMANDS:
        assert command in result.stdout
    assert "--text-column TEXT_COLUMN" in result.stdout and "--no-continuation" in result.stdout


def test_module_entry_point_answers_version():
    result = subprocess.run([sys.executable, "-m", "pastiche", "--version"], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "pastiche 0.1.0")
