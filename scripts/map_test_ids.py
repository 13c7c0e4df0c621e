"""Map the test IDs of an earlier revision onto today's: every default-suite ID then must be a default-suite ID now
(after git's renames of test files), or an opt-in (-m slow) one now, which is listed as moved.

    python scripts/map_test_ids.py BASE_REV

Prints each moved ID and each unmatched one; exits 1 if any old default ID is unmatched. BASE_REV is collected in a
temporary git worktree (its own tests and package), today's in this checkout. docs/contributing.md says why each
moved ID was moved.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def collect(where: Path, marker: str) -> set[str]:
    """Test IDs that ``pytest -m MARKER`` runs in ``where`` (one process, nothing executed)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "-m", marker],
                          cwd=where, capture_output=True, text=True)
    ids = {line.strip() for line in done.stdout.splitlines() if "::" in line}
    if done.returncode != 0 or not ids:
        raise SystemExit(f"map_test_ids: collecting in {where} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return ids


def renames(base: str) -> dict[str, str]:
    """Test files git sees renamed between BASE and the working tree: {old path: new path}. The similarity bar is low
    (30%: a moved file may also have changed much); a wrong pairing can only leave IDs unmatched, never match one."""
    out = subprocess.run(["git", "diff", "-M30%", "--name-status", base, "--", "tests"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return {parts[1]: parts[2] for parts in (line.split("\t") for line in out.splitlines()) if parts[0].startswith("R")}


def main(base: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            old = collect(tree, "not slow")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)
    new_default, new_slow = collect(ROOT, "not slow"), collect(ROOT, "slow")
    moved_files = renames(base)
    unmatched, moved = [], []
    for test_id in sorted(old):
        path, _, rest = test_id.partition("::")
        now = f"{moved_files.get(path, path)}::{rest}"
        if now in new_default:
            continue
        (moved if now in new_slow else unmatched).append(f"{test_id} -> {now}")
    print(f"{len(old)} default IDs at {base}; {len(new_default)} default and {len(new_slow)} slow IDs now; "
          f"{len(moved_files)} test files renamed")
    for line in moved:
        print(f"moved to -m slow: {line}")
    for line in unmatched:
        print(f"UNMATCHED: {line}")
    print(f"{len(moved)} moved to -m slow, {len(unmatched)} unmatched")
    return 1 if unmatched else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/map_test_ids.py BASE_REV")
    sys.exit(main(sys.argv[1]))
