"""The `clean-drops` flow: every new data drop cleaned against everything already accepted, each
into its own folder, and a catalog of the accepted parts that `datasets` reads.

    DROPS/                  the `drops` parameter: one drop per entry, by name order (a folder of
        2026-12-01/         images, a Parquet file or folder, a datasets folder, a .tar shard or
        2026-12-02.tar      a folder of shards); names starting with . or _ are skipped
    DATASET/                the `dataset` parameter
        dataset.json        the catalog: the accepted parts and their data files
        parts/NAME/         a drop's memclean output (cleaned/, scores.parquet, manifest.json, ...)

Each run finds the drops no earlier run accepted (the catalog lists them), cleans each in name
order with `--against` the catalog (every part accepted before it, this run's included), and
after its output is committed adds it to the catalog, which is rewritten atomically (a temporary
file renamed over it). A drop that fails (a bad input, a run the loss guard refuses) leaves the
catalog as it was; the other drops still run, the flow run ends Failed, and the next run retries
it. Rerunning with no new drop does nothing. Read the accepted dataset with

    catalog = json.load(open("DATASET/dataset.json"))
    datasets.load_dataset("parquet", data_dir="DATASET", data_files=catalog["data_files"])

The other parameters are `memclean clean`'s (`model`, `reference`, `flag_fpr`, ...); `data`,
`out`, `against` and `overwrite` are set per drop.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.clean import PARAMETERS as CLEAN_PARAMETERS
from flows.clean import clean, settings_of
from pipeline.fields import REQUIRED, Option, signature
from pipeline.io.outputs import CATALOG, read_catalog
from pipeline.io.store import OutputLock, write_json_atomic

PER_DROP = ("data", "out", "against", "overwrite")  # set by the flow for each drop
PARAMETERS = [Option("drops", ("drops",), str, REQUIRED, "the folder whose entries are the drops", None, (), True),
              Option("dataset", ("dataset",), str, REQUIRED, "the dataset root: dataset.json and parts/", None, (), True)]


def find_drops(drops: str) -> list[Path]:
    """The drops under `drops`, in name order (hidden and _-prefixed entries skipped)."""
    root = Path(drops)
    if not root.is_dir():
        raise ValueError(f"drops {str(root)!r} is not a folder: each entry in it is one drop")
    return sorted(p for p in root.iterdir() if not p.name.startswith((".", "_")))


def part_name(drop: Path, taken: set[str] = frozenset()) -> str:
    """A drop's part folder name: its name, less .tar / .parquet, unless an accepted part already
    has that folder (drops `day1.tar` and `day1/`): then its whole name, then with -2, -3, ...
    A committed part is never the out of a later drop's run."""
    name = drop.name
    for suffix in (".tar", ".parquet"):
        if name.endswith(suffix) and name[: -len(suffix)]:
            name = name[: -len(suffix)]
            break
    for candidate in (name, drop.name):
        if candidate not in taken:
            return candidate
    k = 2
    while f"{drop.name}-{k}" in taken:
        k += 1
    return f"{drop.name}-{k}"


def write_catalog(root: Path, catalog: dict[str, Any]) -> None:
    """dataset.json replaced whole (written beside it, then renamed), data_files derived from the parts."""
    write_json_atomic(root / CATALOG, {**catalog, "data_files": {"train": [f for p in catalog["parts"]
                                                                          for f in p["data_files"]]}})


def accept(root: Path, catalog: dict[str, Any], drop: Path, out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The catalog with a committed part added (its cleaned Parquet files, relative to root)."""
    files = sorted(str(p.relative_to(root)) for p in (out / "cleaned").glob("*.parquet"))
    part = {"drop": drop.name, "source": str(drop.resolve()), "out": str(out.relative_to(root)), "data_files": files,
            "accepted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "counts": manifest["counts"]}
    new = {**catalog, "parts": catalog["parts"] + [part]}
    write_catalog(root, new)
    return new


def clean_drops(**params: Any) -> dict[str, Any]:
    """Clean each drop under `drops` that `dataset`'s catalog has not accepted; returns what each did."""
    logger = get_run_logger()
    root = Path(params.pop("dataset"))
    drops = find_drops(params.pop("drops"))
    try:  # a bad parameter is one clear error now, not the same failure once per drop
        settings_of({**params, "data": str(root), "out": str(root / "parts" / "_"), "overwrite": True})
    except (TypeError, ValueError) as e:
        raise ValueError(f"clean-drops parameters: {e}") from e
    root.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(root)  # one drops run per dataset: a second would rewrite the catalog from a stale copy
    try:
        return _clean_new_drops(logger, root, drops, params)
    finally:
        lock.release()


def _clean_new_drops(logger, root: Path, drops: list[Path], params: dict[str, Any]) -> dict[str, Any]:
    catalog = read_catalog(root / CATALOG)
    done = {p["drop"] for p in catalog["parts"]}
    results, failed = {}, []
    for drop in drops:
        if drop.name in done:
            continue
        out = root / "parts" / part_name(drop, {Path(p["out"]).name for p in catalog["parts"]})
        against = str(root / CATALOG) if catalog["parts"] else None
        try:
            manifest = clean(**{**params, "data": str(drop), "out": str(out), "against": against, "overwrite": True})
        except Exception as e:  # the catalog stays as it was; the next run retries this drop
            logger.error("drop %s failed, not accepted (retried next run): %s", drop.name, e)
            failed.append(drop.name)
            results[drop.name] = {"accepted": False, "error": str(e)}
            continue
        catalog = accept(root, catalog, drop, out, manifest)
        results[drop.name] = {"accepted": True, "out": str(out), "counts": manifest["counts"]}
        logger.info("drop %s accepted: %s", drop.name, manifest["counts"])
    if failed:
        raise RuntimeError(f"{len(failed)} drop(s) failed and were not accepted (retried next run): {failed}; "
                           f"accepted this run: {sorted(k for k, v in results.items() if v['accepted'])}")
    logger.info("%d new drops accepted; the catalog %s lists %d parts", len(results), root / CATALOG,
                len(catalog["parts"]))
    return results


_params = [o for o in CLEAN_PARAMETERS if o.name not in PER_DROP]
clean_drops.__signature__ = signature(PARAMETERS + _params)
clean_drops.__annotations__ = {p.name: p.annotation for p in clean_drops.__signature__.parameters.values()}
clean_drops = flow(name="clean-drops", log_prints=False)(clean_drops)
