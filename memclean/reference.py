"""The documentation's reference pages, generated from the code, never written by hand:

    options.md    every verb's options: the settings models, as `--help` lists them (fields.options)
    columns.md    the columns of every output file: the Parquet schemas and the comments beside
                  their fields (pipeline/io/store.py, pipeline/run/verify.py)
    manifest.md   the manifest's keys by kind of run (pipeline/io/manifest.py MANIFEST_KEYS)
    flows.md      the Prefect flows' parameters (their signatures) and prefect.yaml's deployments

docs/hooks.py adds them to the site when it is built (`make docs`), with benchmarks/RESULTS.md
as the benchmarks page; tests/test_reference.py holds them against the code.
"""
from __future__ import annotations

import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.fields import REQUIRED, Option, options

ROOT = Path(__file__).resolve().parent.parent


def verbs() -> list[tuple[str, type]]:
    """Each verb with a settings model, in the order `memclean --help` lists them."""
    from pipeline.run.settings import DedupRunSettings, RunSettings, ScoreSettings, TrainRunSettings, VerifySettings

    return [("score", ScoreSettings), ("clean", RunSettings), ("dedup", DedupRunSettings), ("verify", VerifySettings),
            ("train", TrainRunSettings)]


def cell(text: Any) -> str:
    """A Markdown table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def default_text(o: Option) -> str:
    if o.default is REQUIRED:
        return "required"
    if o.base is bool:
        return "off"
    if o.default is None:
        return "unset"
    if isinstance(o.default, tuple):
        return "`" + " ".join(map(str, o.default)) + "`"
    return f"`{o.default:.6g}`" if isinstance(o.default, float) else f"`{o.default}`"


def type_text(o: Option) -> str:
    if o.choices:
        return " \\| ".join(f"`{c}`" for c in o.choices)
    base = o.base
    if typing.get_origin(base) is tuple:
        return f"{typing.get_args(base)[0].__name__} ..."
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        return " or ".join(a.__name__ for a in typing.get_args(base))
    return "switch" if base is bool else base.__name__


def options_table(opts: list[Option]) -> list[str]:
    lines = ["| option | value | default | meaning |", "|---|---|---|---|"]
    for o in opts:
        if not o.cli:
            continue
        names = ", ".join(f"`{f}`" for f in [o.flag] + ["--" + a.replace("_", "-") for a in o.aliases])
        lines.append(f"| {names} | {type_text(o)} | {default_text(o)} | {cell(o.help)} |")
    return lines


def options_page() -> str:
    """Every verb's options, by section, as the command line defines them."""
    import dataclasses

    from memclean.cli import SECTION_TITLES, build_parser

    parser = build_parser()
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0]._choices_actions}  # noqa: SLF001
    out = ["# Command-line options", "",
           "Generated from the settings models (`pipeline/run/settings.py` and the sections it assembles), the "
           "source `memclean VERB --help` is built from. A flow parameter has the option's name with underscores: "
           "`--flag-quantile` is `flag_quantile`.", ""]
    for verb, cls in verbs():
        out += [f"## memclean {verb}", "", cell(helps.get(verb, "")), ""]
        for f in dataclasses.fields(cls):
            opts = [o for o in options(cls) if o.path[0] == f.name]
            if opts:
                out += [f"### {SECTION_TITLES.get(f.name, f.name)}", "", *options_table(opts), ""]
    for verb in ("demo", "report"):
        sub = parser._subparsers._group_actions[0].choices[verb]  # noqa: SLF001
        out += [f"## memclean {verb}", "", cell(helps.get(verb, "")), "", "| argument | meaning |", "|---|---|"]
        for a in sub._actions:  # noqa: SLF001
            if a.dest != "help":
                out.append(f"| `{', '.join(a.option_strings) or a.dest}` | {cell(a.help)} |")
        out.append("")
    return "\n".join(out)


def field_comments(module) -> dict[str, str]:
    """{field name: the comment beside it} for the schema fields a module defines as
    ("name", pa.type()),  # comment (the first definition of a name wins)."""
    docs: dict[str, str] = {}
    for line in inspect.getsource(module).splitlines():
        m = re.match(r'\s*\(\s*"(\w+)",\s*.+\),?\s*#\s*(.*)$', line)
        if m and m.group(1) not in docs:
            docs[m.group(1)] = m.group(2).strip()
    return docs


def output_files() -> list[tuple[str, str, pa.Schema]]:
    """(file, what it is, schema) of every Parquet file the verbs write."""
    from pipeline.io.store import CLEANED_SCHEMA, DECISION_SCHEMA, IMAGE, SCORE_SCHEMA
    from pipeline.run.verify import COPIED_SCHEMA, GENERATIONS_SCHEMA

    scores = pa.schema(list(SCORE_SCHEMA) + list(DECISION_SCHEMA))
    flagged = pa.schema(list(scores) + [("image", IMAGE), ("augmented_image", IMAGE)])
    embeddings = pa.schema([("id", pa.string()), ("action", pa.string()), ("embedding", pa.list_(pa.float32()))])
    return [
        ("scores.parquet", "clean and dedup: one row per input (dedup: the score columns null)", scores),
        ("memclean score --out FILE.parquet", "one row per input: the score columns only", SCORE_SCHEMA),
        ("reference_scores.parquet", "clean with --reference: one row per held-out image", SCORE_SCHEMA),
        ("flagged.parquet", "clean: the flagged rows, highest score first, with their images", flagged),
        ("cleaned/*.parquet", "clean and dedup: the dataset for retraining (Hugging Face datasets layout)",
         CLEANED_SCHEMA),
        ("embeddings.parquet", "clean and dedup: the duplicate search's vectors", embeddings),
        ("generations.parquet", "verify: one row per generation", GENERATIONS_SCHEMA),
        ("copied.parquet", "verify: one row per training image whose picture a generation copies", COPIED_SCHEMA),
    ]


EXTRA_DOCS = {  # columns whose schema line carries no comment of its own
    "image": "the image: a struct of PNG or original file bytes and a path (Hugging Face datasets Image)",
    "augmented_image": "the accepted augmentation, null otherwise (Hugging Face datasets Image)",
    "embedding": "the embedder's vector (an augmented row: its variant's)",
}


def column_doc(name: str, docs: dict[str, str]) -> str:
    if docs.get(name):
        return docs[name]
    if name in EXTRA_DOCS:
        return EXTRA_DOCS[name]
    if name.endswith("_se"):
        return f"standard error of `{name[:-3]}`"
    return f"the scorer setting that produced the score (`--{name.replace('_', '-')}`)"


def columns_page() -> str:
    """The columns of every output file, from the schemas and their comments."""
    import pipeline.io.store as store
    import pipeline.run.verify as verify

    docs = {**field_comments(verify), **field_comments(store)}
    out = ["# Output columns", "",
           "Generated from the Parquet schemas (`pipeline/io/store.py`, `pipeline/run/verify.py`) and the comment "
           "beside each field. Every file carries `memclean` schema metadata (settings, model) and the image "
           "columns the `huggingface` metadata that `datasets` reads.", ""]
    for file, what, schema in output_files():
        out += [f"## {file}", "", what, "", "| column | type | meaning |", "|---|---|---|"]
        out += [f"| `{f.name}` | {cell(f.type)} | {cell(column_doc(f.name, docs))} |" for f in schema]
        out.append("")
    return "\n".join(out)


def key_rows(keys: dict[str, Any], prefix: str = "") -> list[str]:
    rows = []
    for k, v in keys.items():
        if isinstance(v, dict):
            rows.append(f"| `{prefix}{k}` | a section: |")
            rows += key_rows(v, f"{prefix}{k}.")
        else:
            rows.append(f"| `{prefix}{k}` | {cell(v)} |")
    return rows


def manifest_page() -> str:
    from pipeline.io.manifest import MANIFEST_KEYS

    out = ["# manifest.json", "", "Generated from `pipeline/io/manifest.py` (`MANIFEST_KEYS`), which the tests hold "
           "against the manifests real runs write. Every output folder has one; `kind` says which verb wrote it.", ""]
    for kind, keys in MANIFEST_KEYS.items():
        out += [f"## memclean {kind}", "", "| key | meaning |", "|---|---|", *key_rows(keys), ""]
    return "\n".join(out)


def flows() -> list[tuple[str, Any]]:
    from flows.clean import clean
    from flows.drops import clean_drops
    from flows.verify import verify

    return [("clean", clean), ("clean-drops", clean_drops), ("verify", verify)]


def flows_page() -> str:
    """The flows' parameters (their signatures, with each option's meaning) and the deployments."""
    import yaml

    from pipeline.run.settings import FlowSettings, RunSettings, VerifySettings
    from flows import drops

    clean_opts = options(RunSettings) + options(FlowSettings)
    opts = {"clean": clean_opts, "clean-drops": drops.PARAMETERS + clean_opts, "verify": options(VerifySettings)}
    out = ["# Prefect flows and deployments", "",
           "Generated from the flows' signatures (built from the settings models) and `prefect.yaml`.", ""]
    for name, fl in flows():
        by_name = {o.name: o for o in opts[name]}
        out += [f"## flow `{name}`", "", cell((fl.fn.__doc__ or "").strip().splitlines()[0]), "",
                "| parameter | default | meaning |", "|---|---|---|"]
        for p in inspect.signature(fl.fn).parameters.values():
            o = by_name[p.name]
            out.append(f"| `{p.name}` | {default_text(o)} | {cell(o.help)} |")
        out.append("")
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    out += ["## Deployments (`prefect.yaml`)", "", "| deployment | flow | schedule | parameters |", "|---|---|---|---|"]
    names = {"flows/clean.py:clean": "clean", "flows/drops.py:clean_drops": "clean-drops",
             "flows/verify.py:verify": "verify"}
    for d in spec["deployments"]:
        cron = ", ".join(s.get("cron", "") for s in d.get("schedules") or []) or "on demand"
        params = ", ".join(f"`{k}={v}`" for k, v in d["parameters"].items())
        out.append(f"| `{names[d['entrypoint']]}/{d['name']}` | `{d['entrypoint']}` | {cell(cron)} | {cell(params)} |")
    return "\n".join(out) + "\n"


PAGES = {"reference/options.md": options_page, "reference/columns.md": columns_page,
         "reference/manifest.md": manifest_page, "reference/flows.md": flows_page}
