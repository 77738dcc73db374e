"""FAISS index files: FAISS's own bytes written a chunk at a time, read back memory-mapped."""
import numpy as np
import pytest

from pipeline.decide.index import IVF_NPROBE, IVF_TRAIN_PER_LIST, read_index, write_index


@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_index_file_is_faiss_own_serialisation(tmp_path, n):
    """write_index streams the rows into the file a chunk at a time (memory-mapped rows in,
    never the index in memory); its bytes are faiss.write_index's for the same index built in
    memory, flat and IVF (with every IVF list non-empty, as asserted, FAISS writes the same
    'full' sizes), and read_index maps it back: the flat index searches as the in-memory one,
    the IVF lists are FAISS's on-disk lists."""
    import faiss

    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 24)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert write_index(mapped, tmp_path / "flat.faiss", "flat") == "flat"
    flat = faiss.IndexFlatIP(24)
    flat.add(x)
    assert (tmp_path / "flat.faiss").read_bytes() == faiss.serialize_index(flat).tobytes()
    mapped_flat = read_index(tmp_path / "flat.faiss")
    assert mapped_flat.ntotal == n
    if n:
        for got, want in zip(mapped_flat.search(x[:5], min(n, 3)), flat.search(x[:5], min(n, 3))):
            assert np.array_equal(got, want)
    if n < 1000:
        return
    assert write_index(mapped, tmp_path / "ivf.faiss", "ivf") == "ivf"
    nlist = int(4 * np.sqrt(n))  # as write_index sizes it; FAISS warns about the small training set
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(24), 24, nlist, faiss.METRIC_INNER_PRODUCT)
    sample = np.sort(np.random.default_rng(0).choice(n, min(n, IVF_TRAIN_PER_LIST * nlist), replace=False))
    ivf.train(x[sample])
    ivf.nprobe = IVF_NPROBE
    ivf.add(x)
    assert min(ivf.invlists.list_size(i) for i in range(nlist)) > 0
    assert (tmp_path / "ivf.faiss").read_bytes() == faiss.serialize_index(ivf).tobytes()
    mapped_ivf = read_index(tmp_path / "ivf.faiss")
    assert isinstance(faiss.downcast_InvertedLists(mapped_ivf.invlists), faiss.OnDiskInvertedLists)
    assert mapped_ivf.nprobe == IVF_NPROBE
    for got, want in zip(mapped_ivf.search(x[:50], 5), ivf.search(x[:50], 5)):
        assert np.array_equal(got, want)  # the same bytes searched by the same code
    with pytest.raises(ValueError, match="index kind"):
        write_index(x, tmp_path / "bad.faiss", "hnsw")


def test_a_faiss_without_memory_mapped_flat_indexes_is_refused_clearly(tmp_path, monkeypatch):
    """FAISS before 1.11 has no IO_FLAG_MMAP_IFC: read_index says which version it needs."""
    import faiss

    write_index(np.eye(3, dtype=np.float32), tmp_path / "i.faiss", "flat")
    monkeypatch.delattr(faiss, "IO_FLAG_MMAP_IFC")
    with pytest.raises(RuntimeError, match="FAISS 1.11 or later"):
        read_index(tmp_path / "i.faiss")
