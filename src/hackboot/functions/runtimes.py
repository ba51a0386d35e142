"""The runtimes this host can run, detected from its interpreters (data: add an entry to support more).

Python comes from the system's ``python3`` (named ``python3.<minor>``), Node.js from ``node`` (named
``nodejs<major>``); a runtime whose executable is missing or does not answer is simply not offered.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hackboot.functions.engine import Runtime


@dataclass(frozen=True)
class Candidate:
    language: Literal["python", "nodejs"]
    executable: Path
    version_argv: tuple[str, ...]
    pattern: str  # captures the full version from the output of version_argv


CANDIDATES: tuple[Candidate, ...] = (
    Candidate("python", Path("/usr/bin/python3"), ("--version",), r"Python (\d+\.\d+\.\d+)"),
    Candidate("nodejs", Path("/usr/bin/node"), ("--version",), r"v(\d+\.\d+\.\d+)"),
)


def runtime_name(language: str, version: str) -> str:
    major, minor, *_ = version.split(".")
    return f"python{major}.{minor}" if language == "python" else f"nodejs{major}"


def detect(candidates: tuple[Candidate, ...] = CANDIDATES) -> list[Runtime]:
    found: list[Runtime] = []
    for cand in candidates:
        if not cand.executable.is_file():
            continue
        try:
            proc = subprocess.run([str(cand.executable), *cand.version_argv], capture_output=True, text=True,
                                  timeout=10, check=False, env={})
        except (OSError, subprocess.TimeoutExpired):
            continue
        match = re.search(cand.pattern, proc.stdout + proc.stderr)
        if proc.returncode != 0 or match is None:
            continue
        version = match.group(1)
        found.append(Runtime(name=runtime_name(cand.language, version), language=cand.language, version=version,
                             executable=cand.executable.resolve()))
    return found
