"""The longest functions and classes of a package, in lines (issue 18's before/after measure).

    python scripts/longest.py fewstep [N]
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path


def spans(root: Path) -> list[tuple[int, str, str]]:
    """(lines, kind, file:qualified name) for every function and class under ``root``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())

        def walk(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    out.append((child.end_lineno - child.lineno + 1, kind, f"{path}:{name}"))
                    walk(child, name + ".")

        walk(tree, "")
    return out


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "fewstep")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    rows = spans(root)
    files = sorted(((len(p.read_text().splitlines()), str(p)) for p in root.rglob("*.py")), reverse=True)[:n]
    for kind in ("def", "class"):
        print(f"longest {kind}s:")
        for lines, _, name in sorted((r for r in rows if r[1] == kind), reverse=True)[:n]:
            print(f"  {lines:4d}  {name}")
    print("longest files:")
    for lines, name in files:
        print(f"  {lines:4d}  {name}")


if __name__ == "__main__":
    main()
