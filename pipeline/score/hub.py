"""Models by Hugging Face Hub id, from the local cache only: `--model google/ddpm-cifar10-32`
(or `ORG/NAME@REVISION`) is the snapshot that `from_pretrained` or `hf download`
put in the cache, and nothing is fetched.

The cache is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub` (read when the
model is resolved, not when Python starts). Its layout is huggingface_hub's:
`models--ORG--NAME/refs/REVISION` holds a commit hash and `models--ORG--NAME/snapshots/COMMIT/`
the files; a 40-hex REVISION names a snapshot directly. A local folder always wins, even one
named like an id.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubModel:
    """A model found in the local Hub cache."""

    repo_id: str
    revision: str  # as asked (main when none)
    commit: str  # the snapshot's commit hash
    snapshot: Path

    def to_dict(self) -> dict[str, str]:
        return {"id": self.repo_id, "revision": self.revision, "commit": self.commit, "snapshot": str(self.snapshot)}


def hub_cache() -> Path:
    """The Hub cache folder, from the environment as huggingface_hub reads it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):  # the older name huggingface_hub still honours
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def is_hub_id(spec: str) -> bool:
    return bool(HUB_ID.match(str(spec)))


def resolve_hub(spec: str, error: type[Exception] = ValueError) -> HubModel:
    """ORG/NAME[@REVISION] -> its snapshot in the local cache, or `error` naming the folder looked
    in and the command that fetches it."""
    m = HUB_ID.match(spec)
    if m is None:
        raise error(f"{spec!r} is not a Hub id (ORG/NAME or ORG/NAME@REVISION)")
    repo, revision = m["repo"], m["revision"] or "main"
    cache = hub_cache()
    folder = cache / f"models--{repo.replace('/', '--')}"
    fetch = f"hf download {repo}" + (f" --revision {revision}" if m["revision"] else "")
    if not folder.is_dir():
        raise error(f"model {spec!r} is not a local folder, and {repo} is not in the Hugging Face cache ({str(folder)!r} "
                    f"not found; cache {str(cache)!r}, from HF_HUB_CACHE or HF_HOME). memclean never downloads: fetch "
                    f"it first with `{fetch}`")
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = folder / "snapshots" / commit
    if not (COMMIT.match(commit) or ref.is_file()) or not snapshot.is_dir():
        have = sorted(p.name for p in (folder / "snapshots").iterdir()) if (folder / "snapshots").is_dir() else []
        refs = sorted(p.name for p in (folder / "refs").iterdir()) if (folder / "refs").is_dir() else []
        raise error(f"revision {revision!r} of {repo} is not in the Hugging Face cache {str(folder)!r} (refs {refs}, "
                    f"snapshots {have}); fetch it with `{fetch}`")
    return HubModel(repo, revision, commit, snapshot)


def model_folder(spec: str, error: type[Exception] = ValueError) -> tuple[Path, HubModel | None]:
    """Where a --model lives: a local folder as named (it wins over an id of the same name),
    else a Hub id's cached snapshot; anything else is returned as a path for the checkpoint's
    own error."""
    path = Path(str(spec)).expanduser()
    if path.is_dir() or not is_hub_id(str(spec)):
        return path, None
    hub = resolve_hub(str(spec), error)
    return hub.snapshot, hub
