"""The layers, read from the imports of every module (DESIGN.md: folders are layers)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "pipeline"


def imports(path: Path) -> set[str]:
    """Every module a file imports (absolute names; relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def modules(folder: str) -> list[Path]:
    return sorted((PIPELINE / folder).rglob("*.py")) if folder else sorted(PIPELINE.rglob("*.py"))


def offenders(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in modules(folder):
        for name in imports(path):
            if name.startswith(forbidden) and not name.startswith(allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_the_library_never_imports_prefect_the_flows_or_the_cli():
    assert offenders("", ("prefect", "prefect_dask", "flows", "memclean")) == []


def test_score_imports_nothing_from_decide_run_or_io_outputs():
    assert offenders("score", ("pipeline.decide", "pipeline.run", "pipeline.io", "pipeline.tools"),
                     allowed=("pipeline.io.data", "pipeline.io.prefetch")) == []  # inputs, not outputs


@pytest.mark.parametrize("folder", ["decide", "io"])
def test_decide_and_io_import_nothing_from_run(folder):
    assert offenders(folder, ("pipeline.run", "pipeline.tools")) == []


def test_every_module_has_a_test_file():
    """One test file per module (tests/test_<module>.py), except package markers."""
    names = {p.stem for p in PIPELINE.rglob("*.py") if p.stem != "__init__"} | {"cli"}
    missing = sorted(n for n in names if not (ROOT / "tests" / f"test_{n}.py").exists())
    assert missing == []
