"""``python -m medvl_jax.train`` on bad input: one ``error:`` line naming the key or file, exit
code 2, nothing built or written; ``--verbose`` adds the traceback. And the config value table."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medvl_jax import cli_errors
from medvl_jax import config as config_lib
from medvl_jax.train import cli, run

SMOKE = "configs/medsynth_sft.py:smoke"


def _train(tmp_path, capsys, *extra, config=SMOKE):
    """Runs the CLI in-process; returns (exit code, stderr). The workdir must stay untouched."""
    wd = tmp_path / "wd"
    capsys.readouterr()
    code = cli.main(["--config", config, "--workdir", str(wd), *extra])
    err = capsys.readouterr().err
    assert not wd.exists() or not any(wd.iterdir())
    return code, err


def _one_line(err: str) -> str:
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("override, named", [
    ("--config.train.stepz=3", "unknown config key 'train.stepz'; did you mean steps?"),
    ("--config.train.steps=2.5", "--config.train.steps=2.5: expected an integer"),
    ("--config.optim.lr=1e999", "optim.lr=inf: must be a finite number"),
    ("--config.optim.lr=inf", "optim.lr=inf: must be a finite number"),
    ("--config.optim.clip_norm=nan", "optim.clip_norm=nan: must be a finite number"),
    ("--config.optim.lr=-0.001", "optim.lr=-0.001: must be a finite number >= 0"),
    ("--config.optim.lr=3.0", "optim.lr=3.0: must be a finite number >= 0 and <= 1"),
    ("--config.optim.warmup_steps=-5", "optim.warmup_steps=-5: must be an integer >= 0"),
    ("--config.optim.grad_accum=0", "optim.grad_accum=0: must be an integer >= 1"),
    ("--config.optim.b2=1.0", "optim.b2=1.0: must be a finite number >= 0 and < 1"),
    ("--config.optim.freeze=(", "optim.freeze='(': must be a valid regular expression"),
    ("--config.data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ("--config.data.batch_size=four", "--config.data.batch_size='four': expected a int"),
    ("--config.data.normalise=(0.5, 0.0)", "data.normalise=(0.5, 0.0): must be a pair"),
    ("--config.data.sources.cxr.weight=-1.0", "data.sources.cxr.weight=-1.0: must be"),
    ("--config.train.mesh.data=0", "train.mesh.data=0: must be an integer >= 1, or -1"),
    ("--config.train.steps=10000000000", "train.steps=10000000000: must be an integer"),
    ("--config.train.log_every=0", "train.log_every=0: must be an integer >= 1"),
    ("--config.evals=3", "--config.evals=3: expected a dict"),
])
def test_bad_config_values_are_one_line_naming_the_key(tmp_path, capsys, override, named):
    code, err = _train(tmp_path, capsys, override)
    assert code == 2
    assert named in _one_line(err)


def test_missing_and_broken_config_files(tmp_path, capsys):
    missing = str(tmp_path / "nope.py")
    code, err = _train(tmp_path, capsys, config=missing)
    assert code == 2 and f"config file not found: {missing}" in _one_line(err)
    broken = tmp_path / "broken.py"
    broken.write_text("import ml_collections\n\ndef get_config():\n    return undefined_name\n")
    code, err = _train(tmp_path, capsys, config=str(broken))
    assert code == 2
    assert f"{broken}:4: NameError: name 'undefined_name' is not defined" in _one_line(err)
    broken.write_text("def get_config(:\n")
    code, err = _train(tmp_path, capsys, config=str(broken))
    assert code == 2 and f"{broken}:1: SyntaxError" in _one_line(err)


def test_workdir_that_is_a_file(tmp_path, capsys):
    wd = tmp_path / "a_file"
    wd.write_text("x")
    capsys.readouterr()
    assert cli.main(["--config", SMOKE, "--workdir", str(wd)]) == 2
    assert f"--workdir {wd} exists and is not a directory" in _one_line(capsys.readouterr().err)
    assert wd.read_text() == "x"


def test_verbose_adds_the_traceback(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, "--config.train.steps=2.5", "--verbose")
    assert code == 2 and err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1] == "error: --config.train.steps=2.5: expected an integer"


def test_an_internal_error_keeps_its_traceback(monkeypatch, tmp_path):
    """An exception that is not a user error is not turned into a one-line message."""
    def broken(*_):
        raise ValueError("a bug inside the loop")

    monkeypatch.setattr(run, "train", broken)
    with pytest.raises(ValueError, match="a bug inside the loop"):
        cli.main(["--config", SMOKE, "--workdir", str(tmp_path / "wd"),
                  "--config.train.steps=1"])


def test_edge_values_that_are_allowed():
    """lr 0 and steps 0 (a run that keeps its starting weights); an integral float for an
    int field is taken as that int; -1 mesh axes."""
    config = run.load(SMOKE, [("optim.lr", 0.0), ("train.steps", 0.0),
                              ("optim.warmup_steps", 1e3), ("train.mesh", {"data": -1})])
    assert config.optim.lr == 0.0 and config.train.steps == 0
    assert config.optim.warmup_steps == 1000 and isinstance(config.optim.warmup_steps, int)


def test_type_checks_cover_values_set_in_the_file_too():
    """A float in an int field, or an int in a bool field, written in the config file itself
    (not via an override) is refused by run.validate, naming the key."""
    config = config_lib.load_config(SMOKE)
    with config.unlocked(), config.train.ignore_type(), config.data.ignore_type():
        config.train.steps = 2.5
        with pytest.raises(config_lib.ConfigError, match=r"train\.steps=2\.5: expected an "
                                                         r"integer, got float"):
            run.validate(config)
        config.train.steps = 3
        config.data.shuffle = 1
        with pytest.raises(config_lib.ConfigError, match=r"data\.shuffle=1: expected a bool"):
            run.validate(config)


def test_check_values_table():
    checks = {"a.lr": config_lib.Number(0, 1), "a.groups.*": config_lib.Number(0),
              "a.kind": config_lib.OneOf(("x", "y"))}
    config_lib.check_values({"a": {"lr": 0.5, "groups": {"^b/.*": 2.0}, "kind": "x"}}, checks)
    config_lib.check_values({"b": 1}, checks)  # Absent keys are not checked.
    with pytest.raises(config_lib.ConfigError, match=r"a\.groups\.\^b/\.\*=-1\.0"):
        config_lib.check_values({"a": {"groups": {"^b/.*": -1.0}}}, checks)
    with pytest.raises(config_lib.ConfigError, match=r"a\.kind='z': must be one of 'x', 'y'"):
        config_lib.check_values({"a": {"kind": "z"}}, checks)
    with pytest.raises(config_lib.ConfigError, match=r"a\.lr=True"):
        config_lib.check_values({"a": {"lr": True}}, checks)  # A bool is not a number.
    with pytest.raises(config_lib.ConfigError, match=r"c\.window\[1\]=nan: must be a finite"):
        config_lib.check_values({"c": {"window": (1.0, float("nan"))}}, checks)


def test_cli_error_messages():
    assert cli_errors.message(KeyError("unknown config key 'x'")) == "unknown config key 'x'"
    assert cli_errors.message(FileNotFoundError(2, "No such file or directory", "/a/b")) == \
        "/a/b: No such file or directory"
    assert cli_errors.message(ValueError("line one\n  line two\n")) == "line one; line two"


def test_command_line_exit_code_and_single_line(tmp_path):
    """The real entry point (``python -m``): exit code 2 and one line on stderr."""
    p = subprocess.run([sys.executable, "-m", "medvl_jax.train", "--config",
                        str(tmp_path / "missing.py"), "--workdir", str(tmp_path / "wd")],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr  # (JAX may print its own warnings before the line.)
    assert p.stderr.splitlines()[-1] == f"error: config file not found: {tmp_path / 'missing.py'}"
