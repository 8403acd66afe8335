"""Rewrite the code deps of every stage in dvc.yaml to the project files its module imports.

    python scripts/sync_dvc_deps.py [--check]

Each stage's `python -m MODULE` is read from its cmd; its `- cli/...py`, `- cxr14/...py`, `- stages/...py` and
`- experiments/...py` deps are replaced by cxr14.imports.project_files(MODULE), in place, keeping every
other line (data deps, comments) as it is. `--check` only says which stages differ (exit 1 if any).
tests/test_dvc_graph.py makes the same comparison.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr14 import imports  # noqa: E402

CODE = re.compile(r"^      - (?:cli|cxr14|stages|experiments)/\S+\.py\s*$")


def synced(text: str) -> tuple[str, list[str]]:
    lines, out, changed = text.splitlines(keepends=True), [], []
    stage, module, in_deps, inserted = None, None, False, False
    for number, line in enumerate(lines):
        if re.match(r"^  (\w[\w-]*):\s*$", line) and out and any(o.startswith("stages:") for o in out):
            stage, module, in_deps, inserted = line.strip().rstrip(":"), None, False, False
        if stage and (match := re.match(r"^    cmd: python -m (\S+)", line)):
            module = match.group(1) if "." in match.group(1) else f"{match.group(1)}.__main__"
        if re.match(r"^    \w", line):
            in_deps = line.startswith("    deps:")
            if in_deps and module:
                out.append(line)
                wanted = imports.project_files(module)
                out += [f"      - {name}\n" for name in wanted]
                listed = [ln.strip()[2:] for ln in _deps_block(lines, number) if CODE.match(ln)]
                if listed != list(wanted):
                    changed.append(stage)
                inserted = True
                continue
        if in_deps and inserted and CODE.match(line):
            continue
        if line.startswith("plots:"):
            stage = None
        out.append(line)
    return "".join(out), changed


def _deps_block(lines: list[str], start: int) -> list[str]:
    block = []
    for line in lines[start + 1:]:
        if not line.startswith("      ") and line.strip():
            break
        block.append(line)
    return block


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only report the stages that differ")
    args = parser.parse_args()
    path = ROOT / "dvc.yaml"
    text, changed = synced(path.read_text())
    if args.check:
        print("differ: " + ", ".join(changed) if changed else "dvc.yaml: every stage lists exactly what it imports")
        return 1 if changed else 0
    if changed:
        path.write_text(text)
    print("rewritten: " + ", ".join(changed) if changed else "dvc.yaml: already in sync")
    return 0


if __name__ == "__main__":
    sys.exit(main())
