"""Models by Hub id from the local Hugging Face cache (score/hub.py), never the network. The cache
is laid out as huggingface_hub lays it out (blobs named by their hash, snapshots of symlinks,
refs holding commit hashes), and huggingface_hub's own readers check that layout."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from memclean.cli import main
from pipeline.io.store import read_metadata
from pipeline.score.hub import resolve_hub
from pipeline.score.models import CheckpointError, resolve_checkpoint

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "examples" / "model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(home: Path, repo_id: str = "memclean/tiny-ddpm", commit: str = COMMIT,
                  tags: tuple[str, ...] = ("main", "v1")) -> Path:
    """HF_HOME/hub/models--ORG--NAME as huggingface_hub writes it; returns the snapshot."""
    folder = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    for src in sorted(p for p in MODEL.rglob("*") if p.is_file() and p.name != "training.json"):
        data = src.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / src.relative_to(MODEL)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    for tag in tags:
        (folder / "refs" / tag).write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home, lay_out_cache(home)


def test_the_layout_is_the_one_huggingface_hub_reads(cache):
    """huggingface_hub's own offline lookup and cache scan find the same snapshot memclean does."""
    from huggingface_hub import scan_cache_dir, snapshot_download

    home, snapshot = cache
    assert resolve_hub("memclean/tiny-ddpm").snapshot == snapshot
    assert Path(snapshot_download("memclean/tiny-ddpm", local_files_only=True, cache_dir=home / "hub")) == snapshot
    (repo,) = scan_cache_dir(home / "hub").repos
    assert repo.repo_id == "memclean/tiny-ddpm" and {r.commit_hash for r in repo.revisions} == {COMMIT}


def test_an_id_a_revision_a_commit_and_a_missing_one(cache):
    home, snapshot = cache
    for spec in ("memclean/tiny-ddpm", "memclean/tiny-ddpm@v1", f"memclean/tiny-ddpm@{COMMIT}"):
        ckpt = resolve_checkpoint(spec)
        assert ckpt.root == snapshot and ckpt.hub.commit == COMMIT and ckpt.layout == "pipeline"
    assert resolve_checkpoint("memclean/tiny-ddpm@v1").hub.revision == "v1"
    with pytest.raises(CheckpointError, match="models--memclean--other.*hf download memclean/other"):
        resolve_checkpoint("memclean/other")
    with pytest.raises(CheckpointError, match="revision 'v9'.*refs \\['main', 'v1'\\]"):
        resolve_checkpoint("memclean/tiny-ddpm@v9")


def test_hf_hub_cache_wins_over_hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "nowhere"))
    snapshot = lay_out_cache(tmp_path / "elsewhere")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere" / "hub"))
    assert resolve_checkpoint("memclean/tiny-ddpm").root == snapshot


def digits(tmp_path: Path, n: int = 3) -> Path:
    data = tmp_path / "data"
    data.mkdir(parents=True)
    for p in sorted((REPO / "examples" / "digits" / "train").glob("u*.png"))[:n]:
        shutil.copy(p, data / p.name)
    return data


def test_score_by_id_records_the_id_revision_and_snapshot(cache, tmp_path):
    home, snapshot = cache
    out = tmp_path / "scores.parquet"
    assert main(["score", "--data", str(digits(tmp_path)), "--model", "memclean/tiny-ddpm@v1", "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["model"]["hub"] == {"id": "memclean/tiny-ddpm", "revision": "v1", "commit": COMMIT,
                                    "snapshot": str(snapshot)}
    assert pq.read_table(out).num_rows == 3


def test_a_missing_id_fails_before_any_image(cache, tmp_path, capsys):
    """The model is checked first: no progress bar, no output, exit 2 with the cache folder and
    the command that fetches it."""
    out = tmp_path / "scores.parquet"
    for verb in ("score", "clean"):
        assert main([verb, "--data", str(digits(tmp_path / verb)), "--model", "google/ddpm-cifar10-32",
                     "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "models--google--ddpm-cifar10-32" in err and "hf download google/ddpm-cifar10-32" in err
        assert "scoring" not in err and not out.exists()


def test_a_folder_named_like_an_id_wins(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(MODEL, tmp_path / "memclean" / "tiny-ddpm")
    ckpt = resolve_checkpoint("memclean/tiny-ddpm")
    assert ckpt.hub is None and ckpt.root == Path("memclean/tiny-ddpm")
