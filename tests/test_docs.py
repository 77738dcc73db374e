"""The documentation: the site builds strictly (broken links and missing pages fail), the README
is a front page whose text the site does not repeat, and the guides' snippets run."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (make install installs it)")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for page in ("reference/options", "reference/columns", "reference/manifest", "reference/flows", "benchmarks"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page
    assert "--flag-copied" in (tmp_path / "site" / "reference" / "options" / "index.html").read_text()


def paragraphs(text: str) -> set[str]:
    """Paragraphs of prose (and code blocks) of at least 120 characters, white space folded."""
    blocks = (" ".join(b.split()) for b in re.split(r"\n\s*\n", text))
    return {b for b in blocks if len(b) >= 120}


def test_the_readme_is_a_front_page_the_site_does_not_repeat():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    docs = "\n\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    assert not paragraphs(readme) & paragraphs(docs)
    for link in re.findall(r"\]\(([^)#]+)", readme):  # every page the README links to exists
        assert link.startswith("http") or (ROOT / link).exists(), link
    assert "make test" in readme and "make test" in (ROOT / ".ci" / "run").read_text() + (ROOT / "Makefile").read_text()
    assert (ROOT / "docs" / "assets" / "report.png").stat().st_size > 10_000  # made by make screenshot


def test_every_guide_is_in_the_site_navigation():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(entries) -> set[str]:
        out = set()
        for e in entries:
            v = next(iter(e.values())) if isinstance(e, dict) else e
            out |= pages(v) if isinstance(v, list) else {v}
        return out

    listed = pages(config["nav"])
    written = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert written <= listed and config["strict"]
