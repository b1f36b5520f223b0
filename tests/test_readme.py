"""README's and docs/'s examples run, their links resolve, and nothing in the repository cites
files outside it (docs/architecture.md is the design). Blocks of README.md or docs/*.md preceded by
`<!-- readme-test: shell -->` or `<!-- readme-test: python -->` are executed in a fresh folder that
sees the repository's `segclip/` (for `segclip/assets/demo_tiny.pt`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"<!-- readme-test: (shell|python) -->\n```(?:bash|python)\n(.*?)```", re.S)
TEXT_SUFFIXES = {".py", ".md", ".sh", ".toml", ".txt", ".html", ".cfg", ".yml", ".yaml"}


def _blocks(pages: list[Path] | None = None) -> list[tuple[str, str, str]]:
    """(page, kind, code) of every marked block."""
    return [(page.name, kind, code)
            for page in (pages or [README, *sorted((ROOT / "docs").glob("*.md"))])
            for kind, code in BLOCK.findall(page.read_text(encoding="utf-8"))]


def test_readme_marks_runnable_examples() -> None:
    kinds = [kind for _, kind, _ in _blocks([README])]
    assert "shell" in kinds and "python" in kinds
    assert ("architecture.md", "python") in {(page, kind) for page, kind, _ in _blocks()}


@pytest.mark.parametrize("page,kind,code", _blocks(),
                         ids=lambda v: v[:30] if isinstance(v, str) else "")
def test_readme_example_runs(page: str, kind: str, code: str, tmp_path: Path) -> None:
    (tmp_path / "segclip").symlink_to(ROOT / "segclip", target_is_directory=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ.get('PATH', '')}"}
    args = ["bash", "-euo", "pipefail", "-c", code] if kind == "shell" else [
        sys.executable, "-c", code]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{code}\n--- stdout\n{result.stdout}\n--- stderr\n" \
                                   f"{result.stderr}"
    assert "Traceback" not in result.stderr
    if kind == "shell" and "-o demo-out" in code:  # README's quick start
        outputs = sorted(p.name for p in (tmp_path / "demo-out").iterdir())
        assert len(outputs) == 16 and any(n.endswith("_conf.png") for n in outputs), outputs


def _markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", _markdown_files(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def _repository_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in listed.split("\n")
            if name and Path(name).suffix in TEXT_SUFFIXES and (ROOT / name).is_file()]


def test_nothing_cites_files_outside_the_repository() -> None:
    offenders = []
    outside = re.compile(r"DESIGN\.md|\.\./shared|shared/reference|reference §|STYLE\.md")
    for path in _repository_files():
        if path.resolve() == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:80]}")
    assert offenders == []


def test_cited_sections_exist() -> None:
    """`docs/NAME.md "Section"` (or `§N`) in code and docs names a heading of that page."""
    cite = re.compile(r'(docs/[\w.-]+\.md),?\s+(?:"([^"]+)"|§(\d+)|`)')
    headings: dict[str, list[str]] = {}
    missing, count = [], 0
    for path in _repository_files():
        if path.resolve() == Path(__file__).resolve():
            continue
        for match in cite.finditer(path.read_text(encoding="utf-8")):
            page, quoted, number = match.groups()
            count += 1
            if quoted is None and number is None:  # a `code span` names no section
                missing.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
                continue
            section = " ".join(quoted.split()) if quoted else f"{number}."
            if page not in headings:
                lines = (ROOT / page).read_text(encoding="utf-8").splitlines() \
                    if (ROOT / page).is_file() else []
                headings[page] = [line.lstrip("#").strip().replace("`", "") for line in lines
                                  if line.startswith("#")]
            if not any(title.startswith(section.replace("`", "")) for title in headings[page]):
                missing.append(f"{path.relative_to(ROOT)}: {page} \"{section}\"")
    assert count > 50 and missing == []


def test_install_hints_name_extras_that_exist_and_readme_installs() -> None:
    import tomllib

    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
                 ["project"]["optional-dependencies"])
    readme = README.read_text(encoding="utf-8")
    named: set[str] = set()
    for path in _repository_files():
        if path.suffix == ".py" and path.relative_to(ROOT).parts[0] in ("segclip", "export",
                                                                         "runtime"):
            text = path.read_text(encoding="utf-8")
            named |= set(re.findall(r"pip install 'segclip\[(\w+)\]'", text))
            assert "raise max_pixels" not in text, path  # the flag is --max-pixels
    assert named and named <= extras, named - extras
    assert "`'segclip[extra]'`" in readme  # README says how the two spellings relate
    for extra in named - {"train"}:
        assert f"pip install '.[{extra}]'" in readme, extra
