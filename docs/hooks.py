"""MkDocs hook: the pages generated from the code (memclean/reference.py: options, output
columns, manifest keys, flows) and the benchmarks page (benchmarks/RESULTS.md) are added to the
site as it is built, so that they can never be stale."""
from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def on_files(files: Files, config) -> Files:
    from memclean.reference import PAGES

    for path, page in PAGES.items():
        files.append(File.generated(config, path, content=page()))
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    files.append(File.generated(config, "benchmarks.md", content=results.replace(
        "# memclean benchmark results", "# Benchmarks (benchmarks/RESULTS.md)", 1)))
    return files
