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


def _writer(root, k):
    """A worker process: 40 puts, half of them the same rows as every other worker's."""
    cache = ScoreCache(root, "k")
    for i in range(40):
        sha = f"shared{i}" if i % 2 else f"w{k}-{i}"
        cache.put([row(sha, float(i))])


def test_several_processes_share_one_cache_folder_without_tearing_it(tmp_path, caplog):
    """Dask workers on one cache folder: each file is written to a temporary name of its own
    writer and renamed whole, so concurrent writers of the same rows (the same file name) never
    leave a torn file, and a reader afterwards sees every row."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    reader = ScoreCache(tmp_path, "k")
    with caplog.at_level(logging.WARNING):
        reader.refresh()
    assert "unreadable" not in caplog.text and not list((tmp_path / "k").glob(".*tmp*"))
    assert all(reader.get(f"shared{i}")["log_volume_growth"] == float(i) for i in range(1, 40, 2))
    assert all(reader.get(f"w{k}-{i}") is not None for k in range(4) for i in range(0, 40, 2))


def test_entries_fold_into_sorted_arrays_and_every_one_is_found(tmp_path, monkeypatch):
    """Past FOLD_AT pending entries the cache folds them into its sorted arrays (112 bytes an
    entry); hex digests and other keys, pending and folded entries, all read back exactly, and
    a key put twice keeps its first scores."""
    import hashlib

    monkeypatch.setattr(ScoreCache, "FOLD_AT", 4)
    a = ScoreCache(tmp_path, "k")
    shas = [hashlib.sha256(str(i).encode()).hexdigest() if i % 3 else f"name-{i}" for i in range(60)]
    for start in range(0, 60, 7):
        a.put([row(s, float(i) + 0.1) for i, s in enumerate(shas) if start <= i < start + 7])
    assert len(a._keys) > 0 and len(a._pending) <= max(4, len(a._keys) // 4)
    a.put([row(shas[5], -1.0)])  # known: neither written nor changed
    b = ScoreCache(tmp_path, "k").refresh()
    for cache in (a, b):
        assert len(cache) == 60
        assert all(cache.get(s) == {**dict.fromkeys(SCORE_COLUMNS, float(i) + 0.1), "nfe": 16}
                   for i, s in enumerate(shas))
        assert cache.get("absent") is None and cache.get("f" * 64) is None
    assert b._keys.nbytes + b._values.nbytes == 60 * (32 + 8 * len(SCORE_COLUMNS))  # 112 bytes an entry


def test_keys_ending_in_nul_bytes_are_found_and_kept_apart(tmp_path):
    """A sha256 is 32 raw bytes; one in 256 ends in 0x00. Keys ending in one, two and 31 NUL
    bytes, and keys that differ only in how many trailing NULs they have, are each found with
    their own value, before and after they are folded into the sorted arrays, and when read
    back by another instance."""
    stem = "ab" * 16
    shas = [stem + "cd" * 15 + "00", stem + "cd" * 14 + "0000", "05" + "00" * 31, "05" + "00" * 30 + "01",
            stem + "cd" * 15 + "01", "00" * 32]
    assert all(len(s) == 64 for s in shas) and len(set(shas)) == len(shas)
    a = ScoreCache(tmp_path, "k")
    a.put([row(s, float(i)) for i, s in enumerate(shas)])  # pending (a dict) until folded
    assert [a.get(s)["log_volume_growth"] for s in shas] == [float(i) for i in range(len(shas))]
    a._fold(a._keys[:0], a._values[:0])  # now only in the sorted arrays
    assert len(a._keys) == len(shas) and not a._pending
    assert [a.get(s)["log_volume_growth"] for s in shas] == [float(i) for i in range(len(shas))]
    b = ScoreCache(tmp_path, "k").refresh()  # read from the file, folded at once
    assert [b.get(s)["log_volume_growth"] for s in shas] == [float(i) for i in range(len(shas))]
    assert b.get("05" + "00" * 29 + "0100") is None  # a near miss is a miss
