"""io/copies_report.py: verify's report shows each copied picture once, beside its generations."""
import re

import numpy as np

from pipeline.io.copies_report import write_verify_report


def manifest(copies: int, pictures: int) -> dict:
    return {"generations": 5, "copies": {"generations": copies, "rate": copies / 5, "interval95": [0.0, 1.0],
                                         "copied_pictures": pictures, "copied_images": 3, "test": "ratio < 1/3"},
            "similar": {"generations": 0, "embedder": "pixel", "threshold": {"value": 0.95, "mode": "given"}},
            "both": 0, "flags": None, "training": {"groups": "exact copies"}, "model": {"path": "m"},
            "data": {"path": "d"}, "settings": {}, "out": "o"}


def test_one_section_per_copied_picture_with_its_generations(tmp_path):
    rng = np.random.default_rng(0)
    gens = rng.uniform(-1, 1, (5, 3, 4, 4)).astype(np.float32)
    pixels = rng.uniform(-1, 1, (3, 48)).astype(np.float32)
    rows = [{"id": f"t{i}.png"} for i in range(3)]
    groups = np.array([0, 0, 1])  # t0 and t1: one picture
    near = np.array([0, 1, 2, 0, 2])
    copy = np.array([True, True, True, False, False])
    d1 = np.array([0.1, 0.05, 0.2, 3.0, 3.0])
    html = write_verify_report(tmp_path, manifest(3, 2), gens, pixels, rows, groups, near, copy, d1, (-1.0, 1.0)).read_text()
    heads = re.findall(r"<h3>(.*?)</h3>", html)
    # picture 0 is copied by generations 0 and 1; shown by t1, nearest to its closest generation (1)
    assert heads == ["t1.png: 2 generation(s)", "t2.png: 1 generation(s)"]
    assert html.index("generation 1<") < html.index("generation 0<")  # closest first
    for src in re.findall(r'src="([^"]+)"', html):
        assert (tmp_path / src).is_file()


def test_no_copies_says_so(tmp_path):
    gens = np.zeros((5, 1, 4, 4), np.float32)
    html = write_verify_report(tmp_path, manifest(0, 0), gens, np.zeros((2, 16), np.float32), [{"id": "a"}, {"id": "b"}],
                               np.array([0, 1]), np.zeros(5, int), np.zeros(5, bool), np.ones(5), (-1.0, 1.0)).read_text()
    assert "No generation copies a training picture." in html
