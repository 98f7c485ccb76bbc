import numpy as np
import pytest

from cmkg import metrics


def _with_errors(err):
    """Predictions whose per-joint error is exactly ``err`` (N, 21), along x."""
    gt = np.zeros((*err.shape, 3))
    pred = gt.copy()
    pred[..., 0] = err
    return pred, gt


def test_golden_epe_and_per_joint_averaging():
    err = np.zeros((2, 21))
    err[0] = np.arange(21)  # sample 0: joint j off by j mm
    err[1] = 2 * np.arange(21)  # sample 1: 2j mm
    pred, gt = _with_errors(err)
    m = metrics.pose_metrics(pred, gt)
    assert m["epe_mm"] == pytest.approx(1.5 * 10)  # mean over joints of 1.5 j
    # visibility: hide sample 1 of joint 20 -> joint 20's mean is 20, not 30;
    # a pooled mean would weight joints by their visible counts instead
    vis = np.ones((2, 21), bool)
    vis[1, 20] = False
    m = metrics.pose_metrics(pred, gt, vis)
    assert m["epe_mm"] == pytest.approx((1.5 * np.arange(20).sum() + 20) / 21)
    pooled = err[vis].mean()
    assert m["epe_mm"] != pytest.approx(pooled)


def test_pck_is_inclusive_and_auc_ranges():
    t = metrics.THRESHOLDS_MM
    err = np.full((1, 21), t[10])  # every error exactly on a threshold
    pred, gt = _with_errors(err)
    m = metrics.pose_metrics(pred, gt)
    assert m["pck"][10] == 1.0 and m["pck"][9] == 0.0
    # curve 0 before index 10, 1 from it: AUC 20-50 over t[8..19] by trapezoids
    y = (np.arange(20) >= 10).astype(float)
    expected = np.sum((y[9:] + y[8:-1]) * np.diff(t[8:])) / 2 / (50 - t[8])
    assert m["auc_20_50"] == pytest.approx(expected)
    assert m["auc_20_50"] == pytest.approx((50 - t[10] + (t[10] - t[9]) / 2) / (50 - t[8]))
    perfect = metrics.pose_metrics(gt, gt)
    assert perfect["auc_20_50"] == 1.0 and perfect["auc_0_50"] == 1.0 and perfect["epe_mm"] == 0
    far = metrics.pose_metrics(*_with_errors(np.full((3, 21), 60.0)))
    assert far["auc_20_50"] == 0.0


def _reference(pred, gt, vis):
    """A direct reimplementation of the reference EvalUtil: per-keypoint lists of errors of the
    visible samples, per-keypoint mean EPE and PCK curve, averaged over keypoints."""
    per_kp = [[] for _ in range(21)]
    for i in range(len(pred)):
        for j in range(21):
            if vis[i, j]:
                per_kp[j].append(np.sqrt(np.sum((pred[i, j] - gt[i, j]) ** 2)))
    thresholds = np.linspace(0, 50, 20)
    epes, curves = [], []
    for data in per_kp:
        if not data:
            continue
        data = np.array(data)
        epes.append(np.mean(data))
        curves.append([np.mean((data <= th).astype(float)) for th in thresholds])
    curve = np.mean(curves, 0)
    x, y = thresholds[8:], curve[8:]
    auc = sum((y[k] + y[k + 1]) / 2 * (x[k + 1] - x[k]) for k in range(len(x) - 1)) / (x[-1] - x[0])
    return np.mean(epes), curve, auc


def test_matches_a_direct_reimplementation_of_the_protocol():
    rng = np.random.default_rng(0)
    gt = rng.normal(0, 40, (50, 21, 3))
    pred = gt + rng.normal(0, 12, (50, 21, 3))
    vis = rng.uniform(size=(50, 21)) < 0.7
    vis[:, 3] = False  # a joint never visible is left out
    m = metrics.pose_metrics(pred, gt, vis)
    epe, curve, auc = _reference(pred, gt, vis)
    assert m["num_joints"] == 20
    assert m["epe_mm"] == pytest.approx(epe, rel=1e-12)
    np.testing.assert_allclose(m["pck"], curve, rtol=1e-12)
    assert m["auc_20_50"] == pytest.approx(auc, rel=1e-12)


def test_denormalise_uses_the_ground_truth_scale():
    pred = np.ones((2, 21, 3))
    out = metrics.denormalise(pred, np.array([10.0, 50.0]))
    assert out[0, 0, 0] == 10.0 and out[1, 5, 2] == 50.0


def test_bad_visibility_shape_and_no_visible_joint():
    pred = np.zeros((2, 21, 3))
    with pytest.raises(ValueError, match="shape"):
        metrics.pose_metrics(pred, pred, np.ones((2, 20), bool))
    with pytest.raises(ValueError, match="no visible joint"):
        metrics.pose_metrics(pred, pred, np.zeros((2, 21), bool))
