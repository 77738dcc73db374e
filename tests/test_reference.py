"""memclean/reference.py: the reference pages hold every option, column, manifest key and flow
parameter the code defines; the manifest's documented keys are the keys real runs write."""
import json

import numpy as np
import pytest
from PIL import Image

from memclean import reference
from memclean.cli import main
from pipeline.fields import options
from pipeline.io.manifest import MANIFEST_KEYS


def test_every_option_of_every_verb_is_listed_with_its_help():
    page = reference.options_page()
    for verb, cls in reference.verbs():
        section = page.split(f"## memclean {verb}\n", 1)[1].split("\n## memclean ", 1)[0]
        for o in options(cls):
            if o.cli:
                assert f"`{o.flag}`" in section and reference.cell(o.help) in section, (verb, o.name)
    assert "## memclean demo" in page and "## memclean report" in page


def test_every_column_of_every_output_is_listed_with_a_meaning():
    page = reference.columns_page()
    for file, _, schema in reference.output_files():
        section = page.split(f"## {file}\n", 1)[1].split("\n## ", 1)[0]
        for f in schema:
            row = next(line for line in section.splitlines() if line.startswith(f"| `{f.name}` |"))
            assert row.rstrip(" |").split("|")[-1].strip(), (file, f.name)


def test_every_flow_parameter_and_deployment_is_listed():
    page = reference.flows_page()
    import inspect

    for name, fl in reference.flows():
        section = page.split(f"## flow `{name}`\n", 1)[1].split("\n## ", 1)[0]
        for p in inspect.signature(fl.fn).parameters:
            assert f"| `{p}` |" in section, (name, p)
    for d in ("clean/celeba", "clean-drops/celeba-drops", "verify/celeba-verify", "clean/demo"):
        assert f"`{d}`" in page


def keys_of(documented, written, where=""):
    """The documented key paths against a real manifest's: each must be the other's."""
    assert set(documented) == set(written), (where, set(documented) ^ set(written))
    for k, v in documented.items():
        if isinstance(v, dict) and isinstance(written[k], dict):
            keys_of(v, written[k], f"{where}{k}.")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A clean, a dedup and a verify output of ten 4x4 images with a zero network."""
    import torch
    from diffusers import DDPMScheduler

    from tests.conftest import save_checkpoint
    from tests.exact import tiny_unet

    root = tmp_path_factory.mktemp("reference")
    unet = tiny_unet(channels=3, size=4)
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
    zero_model_module = save_checkpoint(unet, DDPMScheduler(), root / "zero")
    rng = np.random.default_rng(0)
    data = root / "train"
    data.mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(data / f"t{i}.png")
    (data / "copy.png").write_bytes((data / "t0.png").read_bytes())
    tiny = ["--min-size", "4"]
    model = str(zero_model_module)
    assert main(["clean", "--data", str(data), "--model", model, "--out", str(root / "clean"), "--steps", "2",
                 "--precision-target", "0", *tiny]) == 0
    assert main(["dedup", "--data", str(data), "--out", str(root / "dedup"), *tiny]) == 0
    assert main(["verify", "--data", str(data), "--model", model, "--out", str(root / "verify"), "--generations", "3",
                 "--sample-steps", "2", "--from", str(root / "clean"), "--no-cache", *tiny]) == 0
    return root


@pytest.mark.parametrize("kind", ["clean", "dedup", "verify"])
def test_the_documented_manifest_keys_are_the_keys_runs_write(outputs, kind):
    written = json.loads((outputs / kind / "manifest.json").read_text())
    assert written["kind"] == kind
    keys_of(MANIFEST_KEYS[kind], written)


def test_the_manifest_page_lists_every_documented_key():
    page = reference.manifest_page()
    for kind, keys in MANIFEST_KEYS.items():
        section = page.split(f"## memclean {kind}\n", 1)[1].split("\n## ", 1)[0]
        for k, v in keys.items():
            assert f"| `{k}` |" in section
            for sub in v if isinstance(v, dict) else ():
                assert f"| `{k}.{sub}` |" in section


def test_the_guides_snippets_for_reading_outputs_run(outputs):
    """docs/guides/report.md's datasets, DuckDB and pyarrow snippets, on a real clean output."""
    import re
    from pathlib import Path

    import duckdb

    page = (Path(__file__).resolve().parent.parent / "docs" / "guides" / "report.md").read_text()
    out = str(outputs / "clean")
    blocks = re.findall(r"```(python|sql)\n(.*?)```", page, re.S)
    assert [k for k, _ in blocks] == ["python", "sql", "python"]
    for kind, code in blocks:
        code = code.replace("demo-out", out)
        if kind == "sql":
            rows = duckdb.sql(code).fetchall()
            assert rows and all(r[3] in ("kept", "augmented", "dropped") for r in rows)
        else:
            exec(compile(code, "report.md", "exec"), {})
