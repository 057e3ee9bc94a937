"""README's two set-up commands stay true: the demo one works in a fresh virtualenv on a clean
copy of the repository, and CI runs exactly the test one."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert demo.endswith("asyncgen demo") and tests.endswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_command_in_fresh_virtualenv(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the tracked files")
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    checkout = tmp_path / "asyncgen"
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if source.is_file():
            target = checkout / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    demo = quick_start_commands()[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    result = subprocess.run(
        ["bash", "-c", demo], cwd=checkout, capture_output=True, text=True, env=env, timeout=540
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    # the installed (non-editable) wheel found its templates, and the job finished
    assert "results" in result.stdout + result.stderr
    assert sorted(p.name for p in (checkout / "asyncgen-demo" / "results").glob("results-*"))
    again = subprocess.run(
        ["bash", "-c", ". .venv/bin/activate && asyncgen demo"],
        cwd=checkout,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing to do" in again.stderr + again.stdout
