"""The manifest: counts that always add up, and each section from the run's data."""
import pyarrow as pa
import pytest

from pipeline.io.manifest import counts, manifest, versions


def decided(actions, statuses, flagged, clusters=None):
    n = len(actions)
    return pa.table({"action": actions, "status": statuses, "flagged": flagged,
                     "reject_reason": [None if s == "ok" else "corrupt_image" for s in statuses],
                     "dup_cluster": clusters or [None] * n})


def test_counts_add_up_or_fail_loudly():
    t = decided(["kept", "augmented", "dropped", "rejected"], ["ok", "ok", "ok", "rejected"], [False, True, True, None])
    assert counts(t) == {"input": 4, "rejected": 1, "scored": 3, "flagged": 2, "kept": 1, "augmented": 1, "dropped": 1}
    with pytest.raises(ValueError, match="no action"):  # an error that stays under python -O
        counts(decided(["kept", "lost"], ["ok", "ok"], [False, False]))
    with pytest.raises(ValueError, match="null: 1"):  # a row left pending (no augmentation settled it)
        counts(decided(["kept", None], ["ok", "ok"], [False, True]))


def test_manifest_sections():
    t = decided(["kept", "dropped", "dropped"], ["ok", "ok", "ok"], [True, False, False], [None, 0, 0])
    ref = pa.table({"status": ["ok", "rejected"]})
    run = {"timings_s": {"score": 1.0}, "peak_rss_mb": {"score": 10.0}, "held_mb": {"score": 9.0}}
    m = manifest(t, kind="clean", run=run, threshold={"value": 1.0, "policy": "quantile"}, score="logp",
                 dedup={"embedder": "pixel"}, reference=ref, reference_path="held", model={"fingerprint": "f"},
                 data={"path": "d"}, settings={"steps": 8}, scoring={"input": {"fresh": 2, "reused": 1}},
                 cache_dir=None, out="o")
    assert m["threshold"]["realised_flag_rate"] == pytest.approx(1 / 3) and m["threshold"]["score"] == "logp"
    assert m["dedup"] == {"embedder": "pixel", "clusters": 1, "in_clusters": 2}
    assert m["reference"] == {"path": "held", "input": 2, "scored": 1}
    assert m["scoring"]["scored_fresh"] == 2 and m["scoring"]["reused"] == 1
    assert m["timings_s"] == {"score": 1.0} and m["held_mb"] == {"score": 9.0} and m["kind"] == "clean"
    d = manifest(t, kind="dedup", run=run, threshold=None, score="logp", dedup={"embedder": "pixel"}, reference=None,
                 reference_path=None, model=None, data={"path": "d"}, settings={}, scoring={}, cache_dir=None, out="o")
    assert d["counts"] == {"input": 3, "decoded": 3, "kept": 1, "dropped": 2, "rejected": 0} and d["threshold"] is None
    assert {"torch", "diffusers", "torchdiffeq", "faiss"} <= set(versions())
