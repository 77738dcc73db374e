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


def test_two_shards_at_once_take_turns_on_the_network_and_give_the_same_rows(tmp_path, write_images, monkeypatch):
    """What CUDA runs (two shard threads, run/shards.py), on the CPU: two shards are in flight at
    once (a barrier that only two concurrent shards pass), yet no two batches are ever scored at
    the same time (the device lock), and the rows equal one thread's exactly (the same batches)."""
    import threading

    import pipeline.run.shards as shards_module
    from pipeline.run.shards import score_shards, shard_threads

    assert shard_threads("cpu") == 1 and shard_threads("cuda") == shard_threads("cuda:1") == 2
    data = write_images(n=7, size=(8, 8))
    s = settings(tmp_path, data, no_cache=True)
    shards = list(discover(data).shards(3))
    one = ScoreJob(s, str(tmp_path / "one"))
    (tmp_path / "one").mkdir()
    expected = gather(one, [r["name"] for r in score_shards(one, "input", shards, True, threads=1)])

    both = threading.Barrier(2, timeout=60)  # broken (an error) unless two shards run together
    active, most = [0], [0]
    lock = threading.Lock()
    real_shard, real_batch = shards_module.score_shard, shards_module.score_batch

    def shard(job, items, name, embed, progress=None):
        if name.endswith(("-000000", "-000001")):
            both.wait()
        return real_shard(job, items, name, embed, progress)

    def batch(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return real_batch(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(shards_module, "score_shard", shard)
    monkeypatch.setattr(shards_module, "score_batch", batch)
    two = ScoreJob(s, str(tmp_path / "two"))
    (tmp_path / "two").mkdir()
    results = score_shards(two, "input", shards, True, threads=2)
    assert [r["name"] for r in results] == [shard_name("input", k) for k in range(3)] and most[0] == 1
    got = gather(two, [r["name"] for r in results])
    cols = ["id", "status", "log_volume_growth", "denoising_loss"]
    assert got.table.select(cols).equals(expected.table.select(cols))
    assert np.array_equal(got.vectors, expected.vectors)
