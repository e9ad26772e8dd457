"""A directory on a slow disk, for measuring the disk tier's reads: an ext4 file system in a file,
mounted through a loop device whose reads a cgroup caps at a given bandwidth (blkio's
read_bps_device under cgroup v1, io.max under cgroup v2). Root only.

    python -m tools.throttled_dir up --read-mbps 10 [--size-gb 4] [--where /var/tmp]
    python -m tools.throttled_dir down [--where /var/tmp]

Only the reads of processes in the cgroup are capped (`join` puts one there), and only reads
that reach the device: a file whose pages are in the page cache is read at memory speed, so a
measurement drops them first (posix_fadvise DONTNEED). Writes are not capped.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

NAME = "pagedkv-throttled"
V1 = Path("/sys/fs/cgroup/blkio")
V2 = Path("/sys/fs/cgroup")


@dataclass
class Throttled:
    mount: str     # the directory on the slow disk
    cgroup: str    # the cgroup whose reads are capped
    loop: str      # the loop device
    image: str     # the file behind it
    read_mbps: float

    def join(self, pid: int | None = None) -> None:
        """Puts a process (this one by default) in the cgroup: its reads of the directory are capped."""
        (Path(self.cgroup) / "cgroup.procs").write_text(str(pid or os.getpid()))

    def set_rate(self, read_mbps: float) -> None:
        _limit(Path(self.cgroup), self.loop, read_mbps)
        self.read_mbps = read_mbps


def _limit(cgroup: Path, loop: str, read_mbps: float) -> None:
    device = os.stat(loop).st_rdev
    rate, number = int(read_mbps * 1e6), f"{os.major(device)}:{os.minor(device)}"
    if (cgroup / "blkio.throttle.read_bps_device").exists():
        (cgroup / "blkio.throttle.read_bps_device").write_text(f"{number} {rate}")
    else:
        (cgroup / "io.max").write_text(f"{number} rbps={rate}")


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def _state(where: Path) -> Path:
    return where / NAME / "state.json"


def up(read_mbps: float, size_gb: float = 4.0, where: Path = Path("/var/tmp")) -> Throttled:
    if os.geteuid() != 0:
        raise SystemExit("a throttled directory needs root (a loop device, a mount and a cgroup)")
    base = where / NAME
    if _state(where).exists():
        raise SystemExit(f"{base} is set up already: `python -m tools.throttled_dir down --where {where}` first")
    base.mkdir(parents=True, exist_ok=True)
    image, mount = base / "disk.img", base / "mnt"
    with open(image, "wb") as f:
        f.truncate(int(size_gb * (1 << 30)))
    loop = _run("losetup", "--find", "--show", str(image))
    try:
        _run("mkfs.ext4", "-q", "-F", loop)
        mount.mkdir(exist_ok=True)
        _run("mount", loop, str(mount))
        if V1.is_dir() and (V1 / "blkio.throttle.read_bps_device").exists():
            cgroup = V1 / NAME
        elif (V2 / "cgroup.controllers").exists():
            cgroup = V2 / NAME
        else:
            raise SystemExit("no cgroup controller for block I/O found (blkio under v1, io under v2)")
        cgroup.mkdir(exist_ok=True)
        _limit(cgroup, loop, read_mbps)
    except BaseException:
        subprocess.run(["umount", str(mount)], capture_output=True)
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        raise
    state = Throttled(str(mount), str(cgroup), loop, str(image), read_mbps)
    _state(where).write_text(json.dumps(asdict(state)))
    return state


def down(where: Path = Path("/var/tmp")) -> None:
    path = _state(where)
    if not path.exists():
        return
    state = Throttled(**json.loads(path.read_text()))
    subprocess.run(["umount", state.mount], capture_output=True)
    subprocess.run(["losetup", "-d", state.loop], capture_output=True)
    cgroup = Path(state.cgroup)
    if cgroup.is_dir():
        parent = cgroup.parent / "cgroup.procs"
        for pid in (cgroup / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # the process may have ended meanwhile
                parent.write_text(pid)
        with contextlib.suppress(OSError):
            cgroup.rmdir()
    shutil.rmtree(where / NAME, ignore_errors=True)


@contextlib.contextmanager
def throttled(read_mbps: float, size_gb: float = 4.0, where: Path = Path("/var/tmp")) -> Iterator[Throttled]:
    """A throttled directory for the duration of a `with`, this process in its cgroup."""
    state = up(read_mbps, size_gb, where)
    try:
        state.join()
        yield state
    finally:
        down(where)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--read-mbps", type=float, default=10.0, help="read bandwidth cap, MB/s (up)")
    parser.add_argument("--size-gb", type=float, default=4.0, help="size of the file system (up)")
    parser.add_argument("--where", type=Path, default=Path("/var/tmp"), help="where its files go")
    args = parser.parse_args(argv)
    if args.action == "up":
        state = up(args.read_mbps, args.size_gb, args.where)
        print(json.dumps(asdict(state), indent=2))
        print(f"join the cgroup: echo $$ > {state.cgroup}/cgroup.procs", file=sys.stderr)
    else:
        down(args.where)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
