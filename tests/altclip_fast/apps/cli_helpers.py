"""Running the ``altclip-fast`` command line from the tests: in a subprocess (``run_cli``, the
installed console script when there is one) or in this process from a folder (``cli_main``), and
checking that a failure is one ``altclip-fast: error:`` line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from altclip_fast.apps import cli

REPO = Path(__file__).resolve().parents[3]
CPU_FP32 = ["--device", "cpu", "--dtype", "fp32"]


def _command() -> list[str]:
    """The installed console script when it is there (pip install -e .), else the same entry point."""
    script = shutil.which("altclip-fast")
    return [script] if script else [sys.executable, "-m", "altclip_fast.apps.cli"]


def run_cli(*args, cwd: Path, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",  # no test may try the network
        "HF_HOME": str(cwd / "hf_home"),
        **(env or {}),
    }
    return subprocess.run(
        _command() + [str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True,
        encoding="utf-8", timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, expected: str, code: int = 2) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("altclip-fast: error: "), proc.stderr
    assert expected in lines[0], lines[0]


def cli_main(*args, cwd: Path) -> int:
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return cli.main([str(a) for a in args])
    finally:
        os.chdir(old)


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("altclip-fast: error: "), lines
    assert not any("Traceback" in line for line in lines)
    return lines[-1]
