"""The score cache: content-addressed namespaces, atomic files shared between processes, torn
files never trusted."""
import logging

from pipeline.score.cache import SCORE_COLUMNS, CacheSettings, ScoreCache, namespace


def row(sha, v):
    return {"sha256": sha, **dict.fromkeys(SCORE_COLUMNS, v), "nfe": 16}


def test_the_namespace_changes_with_model_settings_and_spec_only():
    base = namespace("fp", {"steps": 8}, {"size": [16, 16]})
    assert base == namespace("fp", {"steps": 8}, {"size": [16, 16]})
    assert len({base, namespace("fp2", {"steps": 8}, {"size": [16, 16]}),
                namespace("fp", {"steps": 9}, {"size": [16, 16]}),
                namespace("fp", {"steps": 8}, {"size": [32, 32]})}) == 4


def test_puts_are_seen_by_another_instance_and_read_once(tmp_path):
    a, b = ScoreCache(tmp_path, "k"), ScoreCache(tmp_path, "k")
    a.put([row("s1", 1.0), row("s2", 2.0)])
    assert a.get("s1")["log_volume_growth"] == 1.0
    assert b.get("s1") is None
    b.refresh()
    assert b.get("s2")["nfe"] == 16 and len(b._read) == 1
    a.put([row("s3", 3.0), row("s1", 9.0)])  # s1 is known: not written again
    b.refresh()
    assert b.get("s3")["log_volume_growth"] == 3.0 and b.get("s1")["log_volume_growth"] == 1.0
    assert len(list((tmp_path / "k").glob("*.parquet"))) == 2


def test_a_torn_file_is_ignored_and_a_cleared_cache_starts_over(tmp_path, caplog):
    a = ScoreCache(tmp_path, "k")
    a.put([row("s1", 1.0)])
    (tmp_path / "k" / "torn.parquet").write_bytes(b"PAR1 not a whole file")
    b = ScoreCache(tmp_path, "k")
    with caplog.at_level(logging.WARNING):
        b.refresh()
    assert b.get("s1") is not None and "unreadable cache file" in caplog.text
    for f in (tmp_path / "k").glob("*.parquet"):
        f.unlink()
    assert b.refresh().get("s1") is None


def test_cache_settings_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMCLEAN_CACHE", str(tmp_path / "env"))
    assert CacheSettings().root == str(tmp_path / "env")
    assert CacheSettings(cache_dir="/x").root == "/x"
    assert CacheSettings(no_cache=True).root is None
