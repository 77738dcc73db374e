"""The Prefect flow `verify`: memclean verify as a flow, to schedule after a training run (its
parameters are `memclean verify`'s options: run/settings.VerifySettings). One task runs the
library's run_verify; the flow publishes the copy count and the flags' recall as an artifact."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.fields import options, signature
from pipeline.run.settings import VerifySettings
from pipeline.run.verify import run_verify

PARAMETERS = options(VerifySettings)


@task(cache_policy=NO_CACHE)
def verify_task(settings: VerifySettings) -> dict[str, Any]:
    return run_verify(settings)


def publish(m: dict[str, Any], out: str) -> None:
    """A summary artifact: the copies, both tests, and the flags against the copies."""
    c, s, f = m["copies"], m["similar"], m["flags"]
    report = Path(out).resolve() / "report.html"
    lines = [f"# memclean verify: {m['generations']} generations", "",
             "| copies | rate (95% interval) | copied pictures | copied images | similar |", "|---|---|---|---|---|",
             f"| {c['generations']} | {c['rate']:.3f} ({c['interval95'][0]:.3f}-{c['interval95'][1]:.3f}) | "
             f"{c['copied_pictures']} | {c['copied_images']} | {s['generations']} |", ""]
    if f:
        recall = "-" if f["recall"] is None else f"{f['recall']:.3f}"
        lines += [f"The clean run flagged {recall} of the copied images (among the others: "
                  f"{f['flag_rate_not_copied']:.3f}).", ""]
    lines.append(f"Outputs: `{Path(out).resolve()}`" + (f"; report: [report.html]({report.as_uri()})" if report.exists() else ""))
    create_markdown_artifact("\n".join(lines), key="memclean-verify", description="memclean verify run")


def verify(**params: Any) -> dict[str, Any]:
    """memclean verify as a flow: the parameters mean what `memclean verify`'s options mean."""
    settings = VerifySettings.from_flat(params)
    manifest = verify_task(settings)
    publish(manifest, settings.output.out)
    c = manifest["copies"]
    get_run_logger().info("%d generations: %d copy a training picture (%d pictures) -> %s", manifest["generations"],
                          c["generations"], c["copied_pictures"], settings.output.out)
    return manifest


verify.__signature__ = signature(PARAMETERS)
verify.__annotations__ = {p.name: p.annotation for p in verify.__signature__.parameters.values()}
verify = flow(name="verify", log_prints=False)(verify)
