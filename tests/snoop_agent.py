"""A hostile fake agent that looks for its worker's secrets, and prints what it could read as JSON.

    snoop_agent.py RUN_DIR REPORT [-p -- DESCRIPTION]

It reads its own environment, the ``/proc/<pid>/environ`` (and ``maps``) of each ancestor and of
every other process it can see, and every file under RUN_DIR (it is told the path: assume the
attacker knows it). Each read is reported as its text, or as the error that stopped it, in the
JSON file REPORT (it can be large); stdout says only how many reads succeeded.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"ERROR {type(exc).__name__}: {exc.strerror}"


def ancestors() -> list[int]:
    chain, pid = [], os.getppid()
    while pid > 1 and len(chain) < 64:
        chain.append(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return chain


def main(argv: list[str]) -> int:
    run_dir, report_path = Path(argv[0]), Path(argv[1])
    report: dict[str, object] = {
        "uid": os.getuid(),
        "self_environ": read(Path("/proc/self/environ")),
        "ancestors": {str(pid): read(Path(f"/proc/{pid}/environ")) for pid in ancestors()},
        "ancestor_maps": {str(pid): read(Path(f"/proc/{pid}/maps"))[:200] for pid in ancestors()},
        "others": {},
        "run_dir": {},
    }
    others: dict[str, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            text = read(entry / "environ")
            if not text.startswith("ERROR"):
                others[entry.name] = text
    report["others"] = others
    files: dict[str, str] = {}
    for path in sorted(run_dir.rglob("*")) if run_dir.exists() else []:
        if path.is_file() and not path.is_socket():
            files[str(path)] = read(path)
        else:
            files[str(path)] = "(not a regular file)"
    report["run_dir"] = files
    report_path.write_text(json.dumps(report))
    print(f"read {len(others)} other environments and {len(files)} run-folder entries")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1 : sys.argv.index("-p")] if "-p" in sys.argv else sys.argv[1:]))
