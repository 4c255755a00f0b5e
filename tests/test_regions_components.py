"""The compiled one-pass labelling of every label (runs → components) against OpenCV, label by label.

The reference is the way the conversion worked before: per label its mask, ``connectedComponentsWithStats``
on the label's window, ``np.bincount`` score sums, a masked argmax for the peak. Random score maps
(smooth, noisy, quantised so that scores tie), and edge cases: nothing above the threshold, one pixel,
components touching the image border, holes, diagonal contacts between labels, one-row images.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from workers.regions.geometry import (
    Components,
    fill_runs,
    find_components,
    index_runs,
    label_components,
    mask_rings,
    nearest_peak,
    run_components,
    upsampled_rings,
)
from workers.regions.keypoint_labels import mask_peak, peak


def reference(best: np.ndarray, index: np.ndarray, threshold: float, labels: int, min_area: float) -> list:
    """Per label: None, or (boxes, areas, score sums, masks in image coordinates, peaks), largest first."""
    out = []
    foreground = best >= threshold
    for i in range(labels):
        mask = foreground & (index == i)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            out.append(None)
            continue
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        window = mask[y0:y1, x0:x1].astype(np.uint8)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(window, connectivity=8, ltype=cv2.CV_32S)
        areas = stats[1:, cv2.CC_STAT_AREA].astype(np.int64)
        ids = np.arange(1, n)
        keep = areas >= max(min_area, 1)
        ids, areas = ids[keep], areas[keep]
        order = np.argsort(-areas, kind="stable")
        ids, areas = ids[order], areas[order]
        if ids.size == 0:
            out.append(None)
            continue
        boxes = stats[ids, :4].astype(np.int64) + np.array([x0, y0, 0, 0])
        sums = np.bincount(lab.ravel(), weights=best[y0:y1, x0:x1].astype(np.float64).ravel(), minlength=n)
        masks, peaks = [], []
        for k in ids:
            m = np.zeros(best.shape, bool)
            m[y0:y1, x0:x1] = lab == k
            masks.append(m)
            inside = np.where(m, best, -np.inf)
            r, c = divmod(int(np.argmax(inside)), best.shape[1])
            peaks.append((r, c, int(np.count_nonzero(inside == inside[r, c]))))
        out.append((boxes, areas, sums[ids], masks, np.array(peaks)))
    return out


def components(best: np.ndarray, index: np.ndarray, threshold: float, labels: int, min_area: float) -> list:
    runs = index_runs(index, best, np.float32(threshold))
    return label_components(runs, best, labels, min_area, best.shape)


def check_same(best: np.ndarray, index: np.ndarray, threshold: float, labels: int, min_area: float) -> int:
    """Asserts the compiled components equal the reference; returns how many components were compared."""
    ours = components(best, index, threshold, labels, min_area)
    ref = reference(best, index, threshold, labels, min_area)
    assert len(ours) == labels
    compared = 0
    for comps, expected in zip(ours, ref, strict=True):
        if expected is None:
            assert comps is None
            continue
        assert comps is not None
        boxes, areas, sums, masks, peaks = expected
        np.testing.assert_array_equal(comps.boxes, boxes)
        np.testing.assert_array_equal(comps.areas, areas)
        np.testing.assert_array_equal(comps.scores, sums / areas)  # same sums, same pixel order
        np.testing.assert_array_equal(comps.peaks, peaks)
        for k, m in enumerate(masks):
            np.testing.assert_array_equal(comps.image_mask(np.array([k])), m)
            crop, x, y = comps.mask(k)
            bx, by, bw, bh = boxes[k]
            assert (x, y) == (bx, by)
            np.testing.assert_array_equal(crop.view(bool), m[by : by + bh, bx : bx + bw])
        np.testing.assert_array_equal(comps.kept_mask(), np.logical_or.reduce(masks))
        compared += len(masks)
    return compared


def smooth_maps(rng: np.random.Generator, labels: int, h: int, w: int, grid: int) -> np.ndarray:
    coarse = rng.random((labels, grid, grid)).astype(np.float32)
    return np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in coarse])


def best_and_index(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(maps.max(axis=0)), np.ascontiguousarray(maps.argmax(axis=0).astype(np.int32))


@pytest.mark.parametrize("seed", range(6))
def test_random_maps_match_opencv_per_label(seed: int) -> None:
    rng = np.random.default_rng(seed)
    compared = 0
    for labels, (h, w), grid in (
        (1, (37, 53), 5),
        (3, (120, 90), 9),
        (7, (64, 211), 17),
        (20, (150, 160), 40),
    ):
        maps = smooth_maps(rng, labels, h, w, grid)
        if seed % 2:
            maps = np.round(maps * 8) / 8  # plateaus: equal scores, tied peaks
        best, index = best_and_index(maps)
        for threshold, min_area in ((0.0, 0), (0.5, 0), (0.5, 7), (0.8, 2.5)):
            compared += check_same(best, index, threshold, labels, min_area)
    assert compared > 100


def test_noise_many_small_components_and_a_large_image() -> None:
    rng = np.random.default_rng(7)
    maps = rng.random((4, 97, 131)).astype(np.float32)  # salt and pepper: thousands of components
    best, index = best_and_index(maps)
    assert check_same(best, index, 0.6, 4, 0) > 1000
    maps = smooth_maps(rng, 5, 1500, 1400, 28)  # large enough for OpenCV's multi-threaded labelling
    best, index = best_and_index(maps)
    assert check_same(best, index, 0.5, 5, 50) > 5


def test_edge_cases() -> None:
    zeros = np.zeros((20, 30), np.float32)
    index = np.zeros((20, 30), np.int32)
    assert components(zeros, index, 0.5, 3, 0) == [None, None, None]  # nothing above the threshold
    assert index_runs(index, zeros, np.float32(0.5)).shape == (0, 4)

    single = zeros.copy()
    single[7, 11] = 0.9
    (comps, _, _) = components(single, index, 0.5, 3, 0)
    assert comps is not None and len(comps) == 1
    assert comps.boxes.tolist() == [[11, 7, 1, 1]] and comps.peaks.tolist() == [[7, 11, 1]]
    assert components(single, index, 0.5, 3, 2) == [None, None, None]  # below min_area

    for best in (np.full((20, 30), 0.9, np.float32), np.full((1, 40), 0.9, np.float32)):
        idx = np.zeros(best.shape, np.int32)
        (comps,) = components(best, idx, 0.5, 1, 0)  # the whole image: touches every border
        assert comps.boxes.tolist() == [[0, 0, best.shape[1], best.shape[0]]]
        assert check_same(best, idx, 0.5, 1, 0) == 1

    # 8-connectivity per label: label 0's diagonal (0,0)-(1,1) and label 1's (0,1)-(1,0) cross, and each
    # joins its own label's pixels; label 1's two pieces touch nothing of each other
    labels = np.array([[0, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0], [2, 2, 2, 2]], np.int32)
    best = np.ones(labels.shape, np.float32)
    ours = components(best, labels, 0.5, 3, 0)
    assert [len(c) for c in ours] == [1, 2, 1]
    assert check_same(best, labels, 0.5, 3, 0) == 4

    # a ring of label 1 with a hole of label 0: the hole and label 0 around the ring are two components
    ring = np.zeros((30, 30), np.int32)
    ring[5:25, 5:25] = 1
    ring[10:20, 10:20] = 0
    best = np.where(ring > 0, 0.9, 0.7).astype(np.float32)
    best[:5] = 0.1  # background above the ring
    assert [len(c) for c in components(best, ring, 0.5, 2, 0)] == [2, 1]
    assert check_same(best, ring, 0.5, 2, 0) == 3


def test_mask_components_match_opencv() -> None:
    rng = np.random.default_rng(11)
    for _ in range(20):
        h, w = (int(v) for v in rng.integers(1, 90, 2))
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.7)
        score = rng.random((h, w)).astype(np.float32)
        for score_map in (score, None):
            comps = find_components(mask, score_map, 3)
            n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
            areas = stats[1:, cv2.CC_STAT_AREA]
            ids = np.arange(1, n)[areas >= 3]
            ids = ids[np.argsort(-stats[ids, cv2.CC_STAT_AREA], kind="stable")]
            assert len(comps) == ids.size
            np.testing.assert_array_equal(comps.boxes.reshape(-1, 4), stats[ids, :4].reshape(-1, 4))
            np.testing.assert_array_equal(comps.kept_mask(), np.isin(lab, ids))
            if score_map is None:
                assert np.all(comps.scores == 1.0)
            else:
                sums = np.bincount(lab.ravel(), weights=score.astype(np.float64).ravel(), minlength=n)
                np.testing.assert_array_equal(comps.scores, sums[ids] / stats[ids, cv2.CC_STAT_AREA])
    empty = find_components(np.zeros((5, 6), bool), None, 1)
    assert isinstance(empty, Components) and len(empty) == 0 and not empty.kept_mask().any()
    with pytest.raises(ValueError, match="2-D"):
        find_components(np.zeros(5, bool), None, 1)


def test_upsampled_mask_gives_the_same_rings() -> None:
    rng = np.random.default_rng(5)
    maps = smooth_maps(rng, 3, 80, 70, 9)
    best, index = best_and_index(maps)
    seen = 0
    for comps in components(best, index, 0.4, 3, 0):
        for k in range(len(comps) if comps is not None else 0):
            crop, x, y = comps.mask(k)
            up, ux, uy = comps.upsampled_mask(k)
            big = cv2.resize(crop, (crop.shape[1] * 2, crop.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
            np.testing.assert_array_equal(
                up, cv2.copyMakeBorder(big, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
            )
            assert (ux, uy) == (x, y)
            for (a, ha), (b, hb) in zip(upsampled_rings(up), mask_rings(crop), strict=True):
                np.testing.assert_array_equal(a, b)
                assert len(ha) == len(hb)
            seen += 1
    assert seen > 3


def test_tied_peaks_resolved_like_the_window_argmax() -> None:
    rng = np.random.default_rng(2)
    tied = 0
    for _ in range(8):
        maps = np.round(smooth_maps(rng, 4, 90, 110, 8) * 4) / 4  # large plateaus at the top score
        best, index = best_and_index(maps)
        for comps in components(best, index, 0.3, 4, 0):
            if comps is None:
                continue
            x0, y0, x1, y1 = comps.window
            groups = [np.arange(len(comps))] + [np.array([k]) for k in range(len(comps))]
            for ks in groups:
                row, col = mask_peak(comps.window_mask(ks), best[y0:y1, x0:x1])
                assert peak(comps, ks, best) == (row + y0, col + x0)
                tied += int(comps.peaks[ks, 2].max() > 1)
    assert tied > 10  # the tie path was taken


def test_python_and_compiled_passes_agree() -> None:
    rng = np.random.default_rng(9)
    maps = np.round(smooth_maps(rng, 3, 23, 31, 6) * 5) / 5
    best, index = best_and_index(maps)
    threshold = np.float32(0.4)
    runs = index_runs(index, best, threshold)
    np.testing.assert_array_equal(index_runs.py_func(index, best, threshold), runs)
    got = run_components(runs, best, True, 3, best.shape[1])
    for a, b in zip(run_components.py_func(runs, best, True, 3, best.shape[1]), got, strict=True):
        np.testing.assert_array_equal(a, b)
    comps = next(c for c in label_components(runs, best, 3, 0, best.shape) if c is not None and len(c) > 1)
    ks = np.arange(len(comps))
    for scale, shape in ((1, best.shape), (2, (2 * best.shape[0] + 2, 2 * best.shape[1] + 2))):
        a, b = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
        fill_runs(comps.runs, comps.starts, comps.ends, ks, 0, 0, scale, a)
        fill_runs.py_func(comps.runs, comps.starts, comps.ends, ks, 0, 0, scale, b)
        np.testing.assert_array_equal(a, b)
    top = float(comps.peak_scores.max())
    at = ks[comps.peak_scores == top]
    args = (comps.runs, comps.starts, comps.ends, ks, at, best, top, *comps.window[:2])
    np.testing.assert_array_equal(nearest_peak(*args), nearest_peak.py_func(*args))
