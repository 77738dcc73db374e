"""Sharded scoring: shards in order, gathered whole, cached scores reused by a second job."""
import numpy as np
import pytest
from diffusers import DDPMScheduler

from pipeline.io.data import discover
from pipeline.run.settings import RunSettings
from pipeline.run.shards import ScoreJob, gather, job_context, score_shard, score_source, shard_name
from tests.conftest import save_checkpoint
from tests.exact import tiny_unet


def settings(tmp_path, data, **extra):
    model = save_checkpoint(tiny_unet(channels=1, size=8), DDPMScheduler(), tmp_path / "m")
    return RunSettings.from_flat({"data": str(data), "model": str(model), "out": str(tmp_path / "out"),
                                  "solver": "euler", "steps": 2, "batch_size": 2, "shard_size": 3,
                                  "cache_dir": str(tmp_path / "cache"), **extra})


def test_shards_cover_the_source_in_order_and_gather_whole(tmp_path, write_images):
    data = write_images(n=7, size=(8, 8))
    (data / "bad.png").write_bytes(b"x")
    s = settings(tmp_path, data)
    shards = list(discover(data).shards(3))
    assert [len(sh) for sh in shards] == [3, 3, 2]
    staging = tmp_path / "staging"
    staging.mkdir()
    job = ScoreJob(s, str(staging))
    scored, results = score_source(job, discover(data), "input", embed=True)
    assert [r["name"] for r in results] == [shard_name("input", k) for k in range(3)]
    assert scored.table.column("id").to_pylist() == sorted(i.id for sh in shards for i in sh)
    ok = np.array(scored.table.column("status").to_pylist()) == "ok"
    assert scored.vectors.shape[0] == ok.sum() == 7 and scored.flipped is None
    assert sum(r["fresh"] for r in results) == 7 and sum(r["reused"] for r in results) == 0
    # a second job (a restarted run) reuses every score from the cache
    again = [score_shard(job, sh, f"again-{k}", embed=False) for k, sh in enumerate(shards)]
    assert sum(r["reused"] for r in again) == 7 and sum(r["fresh"] for r in again) == 0
    regathered = gather(job, [r["name"] for r in again])
    assert regathered.vectors is None
    cols = ["id", "log_volume_growth"]
    assert regathered.table.select(cols).equals(scored.table.select(cols))
    # the gathered rows are what the unsharded path (score_items over the whole folder, other
    # batches) makes of the same images: identity and status exactly, V to float32 rounding of the
    # sums in another batch shape (64 * 2^-23 of |V|, as tests/test_volume.py bounds it)
    from pipeline.score.scoring import score_items

    model, _, spec, _ = job_context(job)
    direct = [r for rows in score_items(model, discover(data), s.scorer, spec, 3, "cpu") for r in rows]
    got = scored.table.to_pylist()
    assert [(r["id"], r["status"], r["reject_reason"], r["sha256"]) for r in got] == \
        [(r["id"], r["status"], r["reject_reason"], r["sha256"]) for r in direct]
    for a, b in zip(got, direct):
        assert (a["log_volume_growth"] is None) == (b["log_volume_growth"] is None)
        if a["log_volume_growth"] is not None:
            assert a["log_volume_growth"] == pytest.approx(b["log_volume_growth"], rel=64 * 2.0**-23), a["id"]
    assert (staging / "shards" / "input.arrow").is_file()  # gathered into one Arrow IPC file, memory-mapped
    buffers = [b for chunk in scored.table.column("id").chunks for b in chunk.buffers() if b is not None]
    assert buffers and all(not b.is_mutable for b in buffers)  # views of the read-only map, not copies
