"""benchmarks/RESULTS.md is written by several benchmarks: each owns one marked section."""
from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TITLE = "# memclean benchmark results\n\nEach section is written by the script it names; rerun it to refresh that section.\n"


def hardware(device: str = "cpu") -> str:
    """One line saying where a benchmark ran."""
    cpu = platform.processor() or platform.machine()
    line = f"{torch.get_num_threads()} CPU threads ({cpu}), torch {torch.__version__}, Python {platform.python_version()}"
    if device == "cuda" and torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    return line


def write_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section between <!-- name:start --> and <!-- name:end -->."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.rstrip()}\n{end}"
    old = path.read_text() if path.exists() else TITLE
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    tmp.replace(path)


def publish(name: str, title: str, text: str, write: bool = True) -> None:
    """Print a benchmark's section and, unless told not to, write it into RESULTS.md under `title`."""
    if write:
        write_section(name, f"## {title}\n\n{text}")
    print(text)
