"""evaluate: hand-computed semantic and instance scores, block-shape independence, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from catena_mito import storage
from catena_mito.errors import DataError
from catena_mito.evaluate import evaluate, format_report
from catena_mito.instance_metrics import (
    Contingency,
    SemanticCounts,
    instance_scores,
    match_instances,
    pair_ious,
    without_small_truth,
)

# One row of ten voxels, shape (1, 1, 10) — small enough to count by hand.
GT = np.array([1, 1, 1, 1, 0, 2, 2, 0, 3, 3], np.uint32).reshape(1, 1, 10)
INST = np.array([5, 5, 5, 0, 8, 6, 6, 6, 0, 7], np.uint32).reshape(1, 1, 10)
PROB = np.array([255, 200, 128, 127, 255, 0, 0, 0, 0, 0], np.uint8).reshape(1, 1, 10)


def _write(url, array, resolution=(8, 8, 8), chunks=None):
    arr = storage.create_array(url, array.shape, array.dtype, chunks or array.shape,
                               attrs=storage.spatial_attrs(resolution), overwrite=True)
    arr[...] = array
    return url


def test_semantic_by_hand():
    # gt fg  1 1 1 1 0 1 1 0 1 1 ; pred fg (p > 0.5, i.e. > 127.5) 1 1 1 0 1 0 0 0 0 0
    # TP=3, FP=1 (x=4), FN=5 (x=3,5,6,8,9), TN=1 (x=7)
    c = SemanticCounts()
    c.update(GT != 0, PROB > 127.5)
    s = c.scores()
    assert s["counts"] == {"tp": 3, "fp": 1, "fn": 5, "tn": 1}
    assert s["dice"] == pytest.approx(6 / 12)
    assert s["iou"] == pytest.approx(3 / 9)
    assert s["background_dice"] == pytest.approx(2 / 8)
    assert s["background_iou"] == pytest.approx(1 / 7)
    assert s["mean_dice"] == pytest.approx((0.5 + 0.25) / 2)
    assert s["mean_iou"] == pytest.approx((1 / 3 + 1 / 7) / 2)


def test_instances_by_hand():
    # pairs: (1,5) inter 3, |1|=4, |5|=3 -> IoU 3/4; (2,6) inter 2, |2|=2, |6|=3 -> 2/3;
    # (3,7) inter 1, |3|=2, |7|=1 -> 1/2; prediction 8 overlaps nothing.
    c = Contingency()
    c.update(GT, INST)
    s = instance_scores(c.tables(), (0.5, 0.75))
    assert (s["n_gt"], s["n_pred"]) == (3, 4)
    at50, at75 = s["thresholds"]["0.5"], s["thresholds"]["0.75"]
    assert (at50["tp"], at50["fp"], at50["fn"]) == (3, 1, 0)
    assert at50["precision"] == pytest.approx(3 / 4)
    assert at50["recall"] == pytest.approx(1.0)
    assert at50["f1"] == pytest.approx(6 / 7)
    assert at50["ap"] == pytest.approx(3 / 4)
    assert at50["mean_matched_iou"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 2) / 3)
    assert (at75["tp"], at75["fp"], at75["fn"]) == (1, 3, 2)
    assert at75["precision"] == pytest.approx(1 / 4)
    assert at75["recall"] == pytest.approx(1 / 3)
    assert at75["f1"] == pytest.approx(2 / 7)
    assert at75["ap"] == pytest.approx(1 / 6)
    # t=0.50: 3/4; 0.55-0.65: TP 2 -> 2/5; 0.70-0.75: TP 1 -> 1/6; 0.80-0.95: 0.
    assert s["mean_ap"] == pytest.approx((3 / 4 + 3 * 2 / 5 + 2 * 1 / 6) / 10)


def test_one_to_one_matching():
    # Ground truth 1 split into two predictions, each exactly half: IoU 0.5 with both;
    # only one may match.
    gt = np.array([1, 1, 1, 1], np.uint8).reshape(1, 1, 4)
    pred = np.array([1, 1, 2, 2], np.uint8).reshape(1, 1, 4)
    c = Contingency()
    c.update(gt, pred)
    s = instance_scores(c.tables(), (0.5,))["thresholds"]["0.5"]
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)


def test_empty_volumes_are_perfect():
    z = np.zeros((2, 2, 2), np.uint16)
    c = Contingency()
    c.update(z, z)
    s = instance_scores(c.tables())
    assert s["thresholds"]["0.5"]["ap"] == 1.0 and s["mean_ap"] == 1.0
    sc = SemanticCounts()
    sc.update(z > 0, z > 0)
    assert sc.scores()["dice"] == 1.0


def test_evaluate_arrays_uint8_and_float(tmp_path):
    base = str(tmp_path / "d.zarr")
    gt = _write(storage.join_url(base, storage.LABEL_PATHS["mito"]), GT)
    p8 = _write(storage.join_url(base, storage.prediction_path("mito")), PROB)
    pf = _write(storage.join_url(base, "volumes/predictions/float"), PROB.astype(np.float32) / 255)
    inst = _write(storage.join_url(base, storage.INSTANCES_PATH), INST)
    r8 = evaluate(gt, p8, inst, block_shape=(1, 1, 3))
    rf = evaluate(gt, pf, None)
    assert r8["semantic"]["dice"] == pytest.approx(0.5) == rf["semantic"]["dice"]
    assert r8["instances"]["thresholds"]["0.75"]["ap"] == pytest.approx(1 / 6)
    # A dataset URL finds the truth and the default outputs itself.
    rd = evaluate(base)
    assert rd["semantic"]["counts"] == r8["semantic"]["counts"]
    assert rd["instances"] == r8["instances"]
    text = format_report(rd)
    assert "foreground" in text and "0.75" in text and "AP = TP / (TP + FP + FN)" in text


def _random_labels(rng, shape, n, max_len=6):
    out = np.zeros(shape, np.uint64)
    for i in range(1, n + 1):
        lo = [int(rng.integers(0, s)) for s in shape]
        hi = [min(s, a + int(rng.integers(1, max_len))) for a, s in zip(lo, shape)]
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] = i * 1_000_003  # large, sparse ids
    return out


def test_block_shape_independence(tmp_path):
    rng = np.random.default_rng(3)
    shape = (9, 14, 11)
    gt = _random_labels(rng, shape, 25).astype(np.uint32)
    inst = np.roll(_random_labels(np.random.default_rng(3), shape, 25), 1, axis=2)  # shifted copy
    inst[rng.random(shape) < 0.05] = 7  # plus noise objects
    prob = rng.random(shape).astype(np.float32)
    prob[gt != 0] = np.clip(prob[gt != 0] + 0.4, 0, 1)
    base = str(tmp_path / "r.zarr")
    g = _write(storage.join_url(base, "gt"), gt, chunks=(3, 7, 11))
    p = _write(storage.join_url(base, "p"), prob, chunks=(3, 7, 11))
    i = _write(storage.join_url(base, "i"), inst, chunks=(3, 7, 11))
    reports = [evaluate(g, p, i, block_shape=bs) for bs in [(9, 14, 11), (3, 7, 11), (2, 5, 4), (1, 1, 11)]]
    for r in reports[1:]:
        assert r["semantic"] == reports[0]["semantic"]
        assert r["instances"] == reports[0]["instances"]
    assert 0 < reports[0]["instances"]["thresholds"]["0.5"]["tp"] < reports[0]["instances"]["n_gt"]


def test_contingency_compaction_is_exact():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 50, (6, 8, 8))
    pred = rng.integers(0, 40, (6, 8, 8))
    whole = Contingency()
    whole.update(gt, pred)
    pieces = Contingency(compact_every=10)
    for z in range(6):
        pieces.update(gt[z], pred[z])
    a, b = whole.tables(), pieces.tables()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_mismatched_shapes_are_refused(tmp_path):
    base = str(tmp_path / "m.zarr")
    g = _write(storage.join_url(base, "gt"), GT)
    p = _write(storage.join_url(base, "p"), np.zeros((1, 1, 5), np.uint8))
    with pytest.raises(DataError, match="shape"):
        evaluate(g, p)
    with pytest.raises(DataError, match="give --prediction"):
        evaluate(g)
    q = _write(storage.join_url(base, "q"), PROB, resolution=(4, 4, 4))
    with pytest.raises(DataError, match="resolution"):
        evaluate(g, q)


def test_cli_evaluate_writes_json(tmp_path, capsys):
    from catena_mito.cli import main

    base = str(tmp_path / "c.zarr")
    gt = _write(storage.join_url(base, storage.LABEL_PATHS["mito"]), GT)
    p = _write(storage.join_url(base, storage.prediction_path("mito")), PROB)
    i = _write(storage.join_url(base, storage.INSTANCES_PATH), INST)
    out = str(tmp_path / "out" / "scores.json")
    main(["evaluate", "--gt", gt, "--prediction", p, "--instances", i, "--json", out,
          "--block-shape", "1", "1", "4"])
    report = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert report["semantic"]["iou"] == pytest.approx(1 / 3)
    assert report["instances"]["thresholds"]["0.5"]["f1"] == pytest.approx(6 / 7)
    assert "mean AP" in capsys.readouterr().out


# --- exact matching at any threshold, ranked APs ---------------------------------------------

# g1 = x0..9, g2 = x10..19; p1 = x0..5 + x10..13 (10 voxels), p2 = x6..9 (4 voxels).
# IoU(g1, p1) = 6/14, IoU(g1, p2) = 4/10, IoU(g2, p1) = 4/16 = 0.25.
SPLIT_GT = np.repeat(np.array([1, 2], np.uint16), 10).reshape(1, 1, 20)
SPLIT_PRED = np.array([1] * 6 + [2] * 4 + [1] * 4 + [0] * 6, np.uint16).reshape(1, 1, 20)


def _tables(gt, pred):
    c = Contingency()
    c.update(gt, pred)
    return c.tables()


def test_low_threshold_matching_is_optimal_where_greedy_is_not():
    # Greedy by IoU takes (g1, p1) first and leaves g2 alone; the optimum pairs g1-p2, g2-p1.
    g, p, iou = match_instances(_tables(SPLIT_GT, SPLIT_PRED), 0.25)
    assert g.tolist() == [1, 2] and p.tolist() == [2, 1]
    assert iou.tolist() == pytest.approx([0.4, 0.25])
    s = instance_scores(_tables(SPLIT_GT, SPLIT_PRED), (0.25, 0.3))["thresholds"]
    assert (s["0.25"]["tp"], s["0.25"]["fp"], s["0.25"]["fn"]) == (2, 0, 0)
    assert (s["0.3"]["tp"], s["0.3"]["fp"], s["0.3"]["fn"]) == (1, 1, 1)
    # Ranked by size (p1 then p2). MitoEM judges each prediction by its best gt (g1 for
    # both): two true positives, AP 1. COCO's one-to-one: p2 finds g1 taken, a false
    # positive: recall 0.5 at precision 1, so 51 of the 101 recall points.
    assert s["0.25"]["mitoem_ap"] == pytest.approx(1.0)
    assert s["0.25"]["coco_ap"] == pytest.approx(51 / 101)


def test_ranked_ap_by_hand():
    # Pairs (1,5) 3/4, (2,6) 2/3, (3,7) 1/2; sizes 5:3, 6:3, 7:1, 8:1 -> rank 5, 6, 7, 8.
    s = instance_scores(_tables(GT, INST), (0.5, 0.75))
    # IoU 0.75: only 5 is a hit, first in rank: precision 1 up to recall 1/3 (34 points).
    assert s["mitoem_ap75"] == pytest.approx(34 / 101)
    assert s["thresholds"]["0.75"]["coco_ap"] == pytest.approx(34 / 101)
    assert s["thresholds"]["0.5"]["mitoem_ap"] == pytest.approx(1.0)
    # 0.50: 1; 0.55-0.65: hits 5, 6 -> recall 2/3 at precision 1 (67 points); 0.70-0.75: 34.
    assert s["coco_map"] == pytest.approx((1 + 3 * 67 / 101 + 2 * 34 / 101) / 10)


def _brute_force(tables, t):
    """(count, total IoU) of the best matching, by trying every matching of the candidates."""
    ious = pair_ious(tables)
    pairs = [(int(a), int(b), float(v)) for a, b, v in zip(tables["pair_gt"], tables["pair_pred"], ious) if v >= t]
    best = (0, 0.0)

    def walk(i, used_g, used_p, n, total):
        nonlocal best
        if (n, total) > (best[0], best[1] + 1e-12):
            best = (n, total)
        for j in range(i, len(pairs)):
            a, b, v = pairs[j]
            if a not in used_g and b not in used_p:
                walk(j + 1, used_g | {a}, used_p | {b}, n + 1, total + v)

    walk(0, frozenset(), frozenset(), 0, 0.0)
    return best


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=24, max_size=24),
    st.lists(st.integers(0, 5), min_size=24, max_size=24),
    st.sampled_from([0.1, 0.2, 0.3, 0.4, 0.5]),
)
def test_matching_equals_brute_force(gt, pred, t):
    tables = _tables(np.array(gt).reshape(1, 4, 6), np.array(pred).reshape(1, 4, 6))
    g, p, iou = match_instances(tables, t)
    assert len(set(g.tolist())) == len(g) and len(set(p.tolist())) == len(p)  # one-to-one
    assert np.all(iou >= t)
    n, total = _brute_force(tables, t)
    assert len(iou) == n and float(iou.sum()) == pytest.approx(total)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=24, max_size=24),
    st.lists(st.integers(0, 5), min_size=24, max_size=24),
    st.integers(1, 6),
)
def test_scores_without_small_truth_equal_scoring_volumes_without_them(gt, pred, min_size):
    """Leaving out small ground-truth objects in the tables == erasing them (and the
    predictions lying mostly on them) from the volumes before counting."""
    gt = np.array(gt).reshape(1, 4, 6)
    pred = np.array(pred).reshape(1, 4, 6)
    tables = _tables(gt, pred)
    filtered, n_gt, n_pred = without_small_truth(tables, min_size)
    ids, sizes = np.unique(gt[gt > 0], return_counts=True)
    small = ids[sizes < min_size]
    on_small = np.isin(gt, small)
    gone = [p for p in np.unique(pred[pred > 0])
            if np.sum((pred == p) & on_small) > np.sum((pred == p) & (gt > 0) & ~on_small)]
    # the objects left keep their full sizes (IoU is of the whole object), so compare the
    # tables restricted to them rather than re-counting erased volumes
    expect = _tables(np.where(on_small, 0, gt), np.where(np.isin(pred, gone), 0, pred))
    assert n_gt == len(small) and n_pred == len(gone)
    assert np.array_equal(filtered["gt_ids"], expect["gt_ids"])
    assert np.array_equal(filtered["pred_ids"], expect["pred_ids"])
    kept = np.isin(expect["pred_ids"], filtered["pred_ids"])
    full = _tables(gt, pred)
    assert np.array_equal(filtered["pred_sizes"], full["pred_sizes"][np.isin(full["pred_ids"], filtered["pred_ids"])])
    assert kept.all()
    pairs = set(zip(filtered["pair_gt"].tolist(), filtered["pair_pred"].tolist(),
                    filtered["pair_intersection"].tolist()))
    assert pairs == set(zip(expect["pair_gt"].tolist(), expect["pair_pred"].tolist(),
                            expect["pair_intersection"].tolist()))
    scores = instance_scores(tables, (0.5,), min_gt_size=min_size)
    assert scores["n_gt"] == len(ids)  # the main scores count every object
    assert scores["without_small_truth"]["n_gt"] == len(ids) - len(small)


def test_cli_min_gt_size_reports_both(tmp_path, capsys):
    from catena_mito.cli import main

    gt = _write(str(tmp_path / "g.zarr"), GT)
    inst = _write(str(tmp_path / "i.zarr"), INST)
    main(["evaluate", "--gt", gt, "--instances", inst, "--min-gt-size", "3"])
    out = capsys.readouterr().out
    # GT 2 and 3 (2 voxels each) are left out; prediction 7 lies on GT 3 only, 6 on 2
    assert "without the 2 ground-truth objects under 3 voxels (and 2 predictions on them)" in out
    assert "(3 ground-truth, 4 predicted objects)" in out


@pytest.mark.parametrize("args", [["--iou", "1.5"], ["--iou", "0"], ["--iou", "nan"], ["--threshold", "2"],
                                  ["--min-gt-size", "-1"]])
def test_out_of_range_options_are_usage_errors(tmp_path, args, capsys):
    from catena_mito.cli import main

    gt = _write(str(tmp_path / "g.zarr"), GT)
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--gt", gt, "--instances", gt, *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and args[0] in err[0]


def test_low_iou_is_accepted_and_synth_zero_shape_is_a_usage_error(tmp_path, capsys):
    from catena_mito.cli import main

    gt = _write(str(tmp_path / "g.zarr"), SPLIT_GT)
    inst = _write(str(tmp_path / "i.zarr"), SPLIT_PRED)
    main(["evaluate", "--gt", gt, "--instances", inst, "--iou", "0.25"])
    out = capsys.readouterr().out
    assert "MitoEM AP-75" in out and "COCO mAP" in out
    with pytest.raises(SystemExit) as e:
        main(["synth", str(tmp_path / "s.zarr"), "--shape", "0", "10", "10"])
    assert e.value.code == 2
    assert not (tmp_path / "s.zarr").exists()


# --- instance modes from the prediction -----------------------------------------------------


@pytest.fixture
def touching(tmp_path):
    """Two touching boxes (ids 1 and 2), a perfect foreground and a perfect contour."""
    from catena_mito.targets import instance_contour

    gt = np.zeros((6, 8, 14), np.uint32)
    gt[1:5, 1:7, 1:7] = 1  # 144 voxels
    gt[1:5, 1:7, 7:11] = 2  # 96 voxels, touching box 1 along x = 6 | 7
    url = str(tmp_path / "t.zarr")
    _write(storage.join_url(url, storage.LABEL_PATHS["mito"]), gt)
    pred = storage.join_url(url, storage.prediction_path("mito"))
    _write(pred, ((gt != 0) * 255).astype(np.uint8))
    _write(pred + "_contour", (instance_contour(gt) * 255).astype(np.uint8))
    return url, pred


SETTINGS = {"thres_small_instances": 1, "thres_small_seeds": 1, "grow_distance": 8}


def test_instance_modes_compare_connected_components_and_contour(touching):
    url, pred = touching
    report = evaluate(url, pred, instance_modes="auto", label_settings=SETTINGS)
    modes = report["instance_modes"]
    assert list(modes) == ["connected_components", "contour"]
    cc, contour = modes["connected_components"], modes["contour"]
    # one merged object: IoU 144/240 = 0.6 with box 1, 96/240 with box 2
    assert (cc["n_pred"], cc["thresholds"]["0.5"]["tp"], cc["thresholds"]["0.5"]["fn"]) == (1, 1, 1)
    assert cc["thresholds"]["0.5"]["f1"] == pytest.approx(2 / 3)
    assert cc["thresholds"]["0.75"]["tp"] == 0
    # the contour cuts them apart again, exactly
    assert contour["n_pred"] == 2
    assert contour["thresholds"]["0.75"]["f1"] == 1.0 and contour["mean_ap"] == 1.0
    assert contour["settings"]["mode"] == "contour"
    text = format_report(report)
    assert "instance mode connected_components" in text and "instance mode contour" in text


def test_instance_modes_without_a_contour_prediction(touching, tmp_path):
    url, pred = touching
    only_fg = _write(str(tmp_path / "fg.zarr" / "p"), np.asarray(storage.open_volume(pred)[...]))
    report = evaluate(url, only_fg, instance_modes="auto", label_settings=SETTINGS)
    assert list(report["instance_modes"]) == ["connected_components"]
    with pytest.raises(DataError, match="contour probabilities"):
        evaluate(url, only_fg, instance_modes=["contour"])
    with pytest.raises(DataError, match="instance modes"):
        evaluate(url, pred, instance_modes=["watershed"])
    with pytest.raises(DataError, match="label_settings"):
        evaluate(url, pred, instance_modes="auto", label_settings={"thres_seed": 2.0})


def test_instance_modes_refuse_volumes_too_large_for_memory(touching, monkeypatch):
    import catena_mito.evaluate as module

    monkeypatch.setattr(module, "MODES_MAX_VOXELS", 100)
    url, pred = touching
    with pytest.raises(DataError, match="in memory"):
        evaluate(url, pred, instance_modes="auto")


def test_cli_instance_modes_with_a_label_config(touching, tmp_path, capsys):
    from catena_mito.cli import main

    url, pred = touching
    cfg = tmp_path / "label.yaml"
    cfg.write_text(f"input_prediction_path: {pred}\noutput_instance_dir: {url}/volumes/labels\n"
                   "thres_small_instances: 1\nthres_small_seeds: 1\ngrow_distance: 8\n")
    out = str(tmp_path / "modes.json")
    main(["evaluate", "--gt", url, "--prediction", pred, "--instance-modes", "auto",
          "--label-config", str(cfg), "--json", out])
    report = json.loads((tmp_path / "modes.json").read_text())
    assert report["instance_modes"]["contour"]["thresholds"]["0.75"]["f1"] == 1.0
    assert report["instance_modes"]["connected_components"]["n_pred"] == 1
    assert "instance mode contour" in capsys.readouterr().out
