"""CI runs the README's test command, and that command catches upstream drift."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ci_command() -> str:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return next(line for line in lines if line.startswith("pip install"))


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    assert _ci_command() in [b.strip() for b in blocks], (_ci_command(), blocks)
    assert _ci_command().endswith("&& python -m pytest")


def test_ci_takes_the_newest_allowed_dependencies_but_keeps_the_torch_pin():
    """Without -U and the eager strategy, a venv that already holds an old transformers keeps it, and a
    release that breaks us is found by a user instead of CI. The pin keeps pip off a CUDA build."""
    argv = _ci_command().split("&&")[0].split()
    assert "-U" in argv or "--upgrade" in argv
    assert argv[argv.index("--upgrade-strategy") + 1] == "eager"
    assert "torch==2.13.0" in argv
