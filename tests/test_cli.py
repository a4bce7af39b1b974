"""One smoke test per command through the real CLI, and the start-up promise: no torch."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from csc.cli import cli

WriteConfig = Callable[..., Path]

NO_TORCH = """
import sys
from csc.cli import main
sys.argv = ["csc", *sys.argv[1:]]
try:
    main()
except SystemExit as exit:
    code = exit.code
assert "torch" not in sys.modules, "torch was imported"
print("exit", code)
"""


def run_without_torch_check(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in a fresh interpreter and fail if torch got imported."""
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, check=False
    )


def test_help_lists_commands_without_importing_torch() -> None:
    result = run_without_torch_check("--help")
    assert result.returncode == 0, result.stderr
    assert "synth" in result.stdout and "config" in result.stdout
    assert result.stdout.strip().endswith("exit 0")


def test_python_dash_m_csc() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "csc", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "csc, version 0.1.0"


def test_config_command_prints_resolved_config_without_torch(write_config: WriteConfig) -> None:
    path = write_config("classes = ['mito']\nlearning_rte = 1\n")
    result = run_without_torch_check("config", str(path), "epochs=3", "batch_size=2")
    assert result.returncode == 0, result.stderr
    assert "epochs" in result.stdout and "= 3" in result.stdout
    settings = dict(re.findall(r"^(\w+) += (.*)$", result.stdout, re.MULTILINE))  # aligned "="
    assert settings["classes"] == "['mito']"
    assert settings["model_save_path"].startswith(f"'{path.parent}/checkpoints/")
    assert "warning: config name 'learning_rte'" in result.stderr
    assert "did you mean 'learning_rate'?" in result.stderr


def test_config_command_errors_are_one_line(write_config: WriteConfig) -> None:
    runner = CliRunner()
    typo = write_config("learning_rte = 1\n", name="typo.py")
    result = runner.invoke(cli, ["config", str(typo), "--strict"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: config name 'learning_rte'")
    assert "Traceback" not in result.output
    bad = write_config("batch_size = -1\n", name="bad.py")
    result = runner.invoke(cli, ["config", str(bad)])
    assert result.exit_code == 1
    assert "Error: batch_size must be an integer >= 1, got -1" in result.output
    result = runner.invoke(cli, ["config", str(bad), "batch_size=4", "epochz=3"])
    assert "unknown config key in override epochz=...; did you mean 'epochs'?" in result.output


def test_config_command_shows_the_users_traceback(write_config: WriteConfig) -> None:
    path = write_config("x = 1\ny = undefined_name\n")
    result = CliRunner().invoke(cli, ["config", str(path)])
    assert result.exit_code == 1
    assert f'File "{path}", line 2' in result.output
    assert "NameError: name 'undefined_name' is not defined" in result.output


def test_synth_command(tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "synth",
        str(tmp_path),
        "--datasets",
        "1",
        "--crops",
        "2",
        "--shape",
        "16,32,32",
        "--crop-shape",
        "8,16,16",
        "--chunks",
        "8,16,16",
        "--classes",
        "nuc,mito",
    ]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "wrote 1 datasets with 2 crops" in result.output
    assert (tmp_path / "jrc_synth1/jrc_synth1.zarr/recon-1/em/fibsem-uint8/s2/.zarray").is_file()
    again = runner.invoke(cli, args)
    assert (
        again.exit_code == 1 and "already exists" in again.output and "--overwrite" in again.output
    )
    assert runner.invoke(cli, [*args, "--overwrite"]).exit_code == 0
    bad = runner.invoke(cli, ["synth", str(tmp_path), "--shape", "16,32"])
    assert bad.exit_code == 2 and "give 3 sizes in z,y,x order" in bad.output
