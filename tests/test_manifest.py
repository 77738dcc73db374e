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
    with pytest.raises(AssertionError):
        counts(decided(["kept", "lost"], ["ok", "ok"], [False, False]))


def test_manifest_sections():
    t = decided(["kept", "dropped", "dropped"], ["ok", "ok", "ok"], [True, False, False], [None, 0, 0])
    ref = pa.table({"status": ["ok", "rejected"]})
    m = manifest(t, threshold={"value": 1.0, "policy": "quantile"}, score="logp", dedup={"embedder": "pixel"},
                 reference=ref, reference_path="held", model={"fingerprint": "f"}, data={"path": "d"},
                 settings={"steps": 8}, timings={"score": 1.0}, peak_rss_mb={"score": 10.0},
                 scoring={"input": {"fresh": 2, "reused": 1}}, cache_dir=None, out="o")
    assert m["threshold"]["realised_flag_rate"] == pytest.approx(1 / 3) and m["threshold"]["score"] == "logp"
    assert m["dedup"] == {"embedder": "pixel", "clusters": 1, "in_clusters": 2}
    assert m["reference"] == {"path": "held", "input": 2, "scored": 1}
    assert m["scoring"]["scored_fresh"] == 2 and m["scoring"]["reused"] == 1
    assert {"torch", "diffusers", "torchdiffeq", "faiss"} <= set(versions())
