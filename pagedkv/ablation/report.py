"""Where benchmark results go: a fresh folder that the tool names, and docs/BENCHMARKS.md (one
section per benchmark) and docs/<folder>/ only when asked with --update-docs."""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import sys
import tempfile
from pathlib import Path

# The checkout's docs/ (this file is pagedkv/ablation/report.py); an installed package has none.
BENCHMARKS = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nMeasured figures, newest run of each benchmark. Every section names the "
          "machine, the date and the command that produced it; rerun that command with `--update-docs` to refresh it "
          "(without it, results go to a fresh folder the tool names and the repository is left as it is).\n")


def add_output_arguments(parser: argparse.ArgumentParser, docs_folder: str | None = None) -> None:
    """--out and --update-docs. docs_folder: the folder under docs/ that --update-docs refreshes."""
    into = f"docs/{docs_folder}/ and " if docs_folder else ""
    parser.add_argument("--out", type=Path, help="folder for the results (default: a fresh folder under the "
                        "system's temporary directory, named when the tool starts"
                        + (f"; docs/{docs_folder} with --update-docs)" if docs_folder else ")"))
    parser.add_argument("--update-docs", action="store_true",
                        help=f"also write {into}this benchmark's section of docs/BENCHMARKS.md (the repository)")


def output_folder(args: argparse.Namespace, tool: str, docs_folder: str | None = None) -> Path:
    """args.out, else docs/<docs_folder> with --update-docs, else a fresh temporary folder."""
    if args.update_docs and not BENCHMARKS.parent.is_dir():
        raise SystemExit(f"--update-docs writes a checkout's docs/, and {BENCHMARKS.parent} is not there: run it from a "
                         "checkout of pagedkv, or leave --update-docs out")
    if args.out:
        out = Path(args.out)
    elif args.update_docs and docs_folder:
        out = BENCHMARKS.parent / docs_folder
    else:
        out = Path(tempfile.mkdtemp(prefix=f"pagedkv-{tool}-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{tool}: results go to {out}", file=sys.stderr, flush=True)
    return out


def publish(title: str, body: str, out: Path, update_docs: bool, machine: str | None = None,
            docs_body: str | None = None) -> None:
    """The section as out/BENCHMARKS-section.md; in docs/BENCHMARKS.md too with --update-docs
    (docs_body there, when its links must point elsewhere)."""
    write_section(title, body, machine, path=out / "BENCHMARKS-section.md")
    if update_docs:
        write_section(title, docs_body or body, machine)
        print(f"updated the section '{title}' of {BENCHMARKS}", file=sys.stderr)


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
    """The command that runs, with a `--notes` paragraph shown as NOTES (it is printed below)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    program = ["-m", spec.name] if spec else [os.path.relpath(sys.argv[0])]
    args = list(sys.argv[1:])
    for i, arg in enumerate(args):
        if arg.startswith("--notes="):
            args[i] = "--notes=NOTES"
        elif arg == "--notes" and i + 1 < len(args):
            args[i + 1] = "NOTES"
    return "python " + " ".join(shlex.quote(a) for a in [*program, *args])


def write_section(title: str, body: str, machine: str | None = None, path: Path | None = None) -> None:
    """Replaces (or appends) the section `## title` of `path` (docs/BENCHMARKS.md) with the body
    and its provenance."""
    path = path or BENCHMARKS
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
