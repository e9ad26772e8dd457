"""Writing benchmark figures into docs/BENCHMARKS.md, one section per benchmark."""
from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nMeasured figures, newest run of each benchmark. Every section names the "
          "machine, the date and the command that produced it; rerun that command to refresh it.\n")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def command_line() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec else [os.path.relpath(sys.argv[0])]
    return "python " + " ".join(shlex.quote(a) for a in [*program, *sys.argv[1:]])


def write_section(title: str, body: str, machine: str | None = None, path: Path = BENCHMARKS) -> None:
    """Replaces (or appends) the section `## title` with the body and its provenance."""
    text = path.read_text() if path.exists() else HEADER
    stamp = (f"Machine: {machine or machine_description()}  \n"
             f"Date: {datetime.date.today().isoformat()}  \n"
             f"Command: `{command_line()}`\n\n")
    section = f"## {title}\n\n{stamp}{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
