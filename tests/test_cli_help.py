"""The command line explains itself: every flag has help with its default or says it is required, building the
parser imports no torch, presets show their own values, and config errors are one line naming the flag."""

import subprocess
import sys

import pytest

from ranklens.cli import build_parser, main
from ranklens.config import Config
from ranklens.errors import RanklensError
from ranklens.reproduce.presets import PRESETS
from ranklens.version import __version__

JOBS = [["collect"], ["spectrum"], ["train", "sae"], ["train", "lorsa"], ["eval", "sae"], ["eval", "lorsa"],
        ["zpattern"], ["lorsa-top"], ["reproduce"]]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _subparser(argv: list[str]):
    parser = build_parser([*argv])
    for name in argv:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("argv", JOBS, ids=" ".join)
def test_every_flag_has_help_with_default_or_required(argv):
    parser = _subparser(argv)
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help",)]
    assert len(flags) > 3
    for action in flags:
        assert action.help, f"{argv} {action.option_strings} has no help"
        if action.dest not in ("config", "out", "quiet"):
            assert "(default: " in action.help or "(required)" in action.help or "(optional)" in action.help, \
                (argv, action.option_strings, action.help)


def _leaves(parser, path=()):
    subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    if not subs:
        yield list(path), parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


def test_every_command_is_covered_and_every_flag_says_its_default():
    """Every leaf command, not only the jobs above: each flag states its default, or that it is required or
    optional (a flag added to a new command without help fails here)."""
    leaves = list(_leaves(build_parser()))
    assert {" ".join(p) for p, _ in leaves} >= {" ".join(j) for j in JOBS} | {"sites", "dashboard", "serve", "plan"}
    for path, parser in leaves:
        for action in parser._actions:
            if not action.option_strings or action.dest in ("help", "config", "out", "quiet"):
                continue
            assert action.help and ("(default: " in action.help or "(required)" in action.help
                                    or "(optional)" in action.help), (path, action.option_strings, action.help)


def test_help_states_syntax_and_lists_as_a_shell_user_types_them(capsys):
    text = " ".join(_help(["reproduce"], capsys).split())
    assert "(default: prose,code,zh)" in text and "(default: 32,128)" in text
    text = " ".join(_help(["spectrum"], capsys).split())
    assert "corpus=NAME or model=NAME" in text and "'Lmid.attn_out'" in text
    text = " ".join(_help(["train", "sae"], capsys).split())
    assert "an integer in [1, d], or auto" in text and "store: train from an activation store" in text
    text = " ".join(_help(["train", "lorsa"], capsys).split())
    assert "--layer" in text and "--heads" in text and "default 8 x d_model" in text


def test_reproduce_help_shows_the_chosen_presets_values(capsys):
    quick = " ".join(_help(["reproduce"], capsys).split())
    standard = " ".join(_help(["reproduce", "--preset", "standard"], capsys).split())
    assert f"(default: {PRESETS['standard']['sae_tokens']})" in standard
    assert "(default: 32768)" in quick and "(default: 32768)" not in standard.split("--sae-tokens")[1][:200]
    assert "(default: standard)" in standard


def test_building_the_parser_imports_no_torch():
    code = ("import sys; from ranklens.cli import build_parser; build_parser(['reproduce']); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"ranklens {__version__}"
    done = subprocess.run([sys.executable, "-m", "ranklens", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == f"ranklens {__version__}"


def test_config_errors_name_the_flag():
    from ranklens.analysis.config import ZPatternConfig
    from ranklens.train.config import SAETrainConfig

    with pytest.raises(RanklensError, match=r"^--head is required \(arguments\)$"):
        ZPatternConfig.load(text="hello")
    with pytest.raises(RanklensError, match=r"^--lr -1: input should be greater than 0"):
        SAETrainConfig.load(lr="-1")
    with pytest.raises(RanklensError, match=r"^--d-init 0: expected an integer >= 1 or auto"):
        SAETrainConfig.load(d_init="0")
    with pytest.raises(RanklensError, match="unknown option 'bogus'"):
        SAETrainConfig.build({"bogus": 1})


def test_yaml_errors_are_one_line(tmp_path):
    from ranklens.train.config import SAETrainConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(RanklensError, match=r"is not valid YAML at line 2"):
        SAETrainConfig.load(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(RanklensError, match="must hold a mapping, got list"):
        Config.load(listed)
