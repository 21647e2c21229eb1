"""Every code example in README.md and docs/ runs: Python blocks are executed, YAML excerpts match their files,
and the files that shell commands name exist."""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks(language: str) -> list:
    out = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for i, match in enumerate(_BLOCK.finditer(text)):
            if match.group(1) == language:
                out.append(pytest.param(match.group(2), id=f"{os.path.relpath(path, ROOT)}#{i}"))
    return out


@pytest.mark.parametrize("code", _blocks("python"))
def test_python_examples_run(code):
    exec(compile(code, "<example>", "exec"), {"__name__": "__example__"})  # noqa: S102 - the docs' own examples


@pytest.mark.parametrize("code", _blocks("yaml"))
def test_yaml_examples_are_excerpts_of_their_files(code):
    first = code.splitlines()[0]
    match = re.match(r"#\s*(\S+\.yaml)", first)
    assert match, "a YAML example names its file in its first line"
    with open(os.path.join(ROOT, match.group(1)), encoding="utf-8") as f:
        lines = [line.rstrip() for line in f]
    position = 0
    for line in code.splitlines()[1:]:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert line.rstrip() in lines[position:], f"{line!r} is not in {match.group(1)} (in order)"
        position = lines.index(line.rstrip(), position) + 1


@pytest.mark.parametrize("code", _blocks("bash"))
def test_files_named_by_shell_examples_exist(code):
    for path in re.findall(r"(?:examples|benchmarks)/[\w/.-]+\.(?:py|yaml)", code):
        assert os.path.exists(os.path.join(ROOT, path)), path
