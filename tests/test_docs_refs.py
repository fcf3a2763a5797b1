"""No file of the repository cites design documents that live outside it: the method is in docs/method.md."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".md", ".yaml")
SKIPPED_DIRS = ("runs/", ".venv/")
# Assembled here so that this file does not match its own patterns.
FORBIDDEN = tuple(name + ".md" for name in ("METHOD", "ARCHITECTURE", "DATA", "PAPER_RESULTS")) + (
    "../" + "shared", "/work/" + "shared")


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [p for p in out.stdout.split("\0")
            if p.endswith(SUFFIXES) and not p.startswith(SKIPPED_DIRS)]


def test_no_file_cites_documents_outside_the_repository():
    files = tracked_files()
    assert "docs/method.md" in files or (ROOT / "docs" / "method.md").is_file()
    hits = []
    for name in files:
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{name}:{number}: {pattern}" for pattern in FORBIDDEN if pattern in line]
    assert not hits, "cite docs/method.md instead of files outside the repository:\n" + "\n".join(hits)
