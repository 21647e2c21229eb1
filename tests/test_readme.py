"""The README's two set-up commands are what CI and a newcomer run: keep them in step with .ci/run."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts: str) -> str:
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line for line in _read(".ci", "run").splitlines() if line.startswith("python3 -m venv")]
    assert len(ci_lines) == 1
    assert ci_lines[0] in _read("README.md"), "README's test command and .ci/run differ"
    assert "pytest" in ci_lines[0]


def test_readme_demo_command_runs_the_digits_demo():
    demo = [line for line in _read("README.md").splitlines() if re.match(r"python3 -m venv .*examples/digits\.py", line)]
    assert len(demo) == 1, "README must give one command that sets up and runs the demo"
    assert os.path.exists(os.path.join(ROOT, "examples", "digits.py"))
