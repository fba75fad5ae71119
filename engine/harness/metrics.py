"""Scores of a reconstruction against ground truth, as RealFusion reports them: pure numpy/scipy functions.

Geometry: points sampled on the reconstructed mesh are put in the ground truth's normalized
frame, their scale estimated, then aligned to the ground-truth points by ICP with a similarity
(rotation, translation, uniform scale; Umeyama's closed form at each step); then the F-score at
0.05 and the Chamfer distance are measured there.

Normalization (the unit of the 0.05 threshold): the ground-truth cloud is centered at its
bounding-box center and scaled so the box's *longest side is 1* (the unit cube of Occupancy
Networks and of the shelf-supervised mesh benchmarks); the prediction gets the same transform
before alignment. So 0.05 is 5% of the object's largest extent.

Images: PSNR over a data range of 1, and SSIM as Wang et al. 2004 define it (11-tap Gaussian
window of sigma 1.5, K1 = 0.01, K2 = 0.03, population statistics, a window's radius cropped
from the borders, channels averaged), which equals scikit-image's
`structural_similarity(gaussian_weights=True, use_sample_covariance=False)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .objects import surface_points

F_SCORE_THRESHOLD = 0.05
F_SCORE_THRESHOLDS = (0.05, 0.02)  # the paper's, and a stricter one that sees details the paper's misses
NORMALIZATION = "ground truth centered on its bounding box, longest side scaled to 1"

__all__ = ["surface_points", "Similarity", "normalization", "estimate_scale", "umeyama", "icp", "align",
           "nearest_distances", "precision_recall", "fscore", "chamfer", "score_geometry", "GeometryScore",
           "psnr", "ssim"]


# --------------------------------------------------------------------------------------------- geometry


@dataclass
class Similarity:
    """p -> scale * rotation @ p + translation."""

    scale: float = 1.0
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(points, np.float64) @ self.rotation.T + self.translation

    def matrix(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.scale * self.rotation
        m[:3, 3] = self.translation
        return m

    def then(self, other: "Similarity") -> "Similarity":
        """`other` applied after `self`."""
        return Similarity(other.scale * self.scale, other.rotation @ self.rotation,
                          other.scale * other.rotation @ self.translation + other.translation)

    @property
    def rotation_deg(self) -> float:
        return math.degrees(math.acos(np.clip((np.trace(self.rotation) - 1.0) / 2.0, -1.0, 1.0)))


def normalization(gt: np.ndarray) -> Similarity:
    """The transform that puts `gt` in the unit frame the F-score threshold is measured in (see above)."""
    gt = np.asarray(gt, np.float64)
    low, high = gt.min(0), gt.max(0)
    longest = float((high - low).max())
    scale = 1.0 / longest if longest > 0 else 1.0
    return Similarity(scale, np.eye(3), -scale * 0.5 * (low + high))


def estimate_scale(source: np.ndarray, target: np.ndarray) -> Similarity:
    """Scale estimation: centroids matched and RMS radii about them made equal (no rotation)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mu_s, mu_t = source.mean(0), target.mean(0)
    rms_s = math.sqrt(((source - mu_s) ** 2).sum(1).mean())
    rms_t = math.sqrt(((target - mu_t) ** 2).sum(1).mean())
    scale = rms_t / rms_s if rms_s > 0 else 1.0
    return Similarity(scale, np.eye(3), mu_t - scale * mu_s)


def umeyama(source: np.ndarray, target: np.ndarray, with_scale: bool = True) -> Similarity:
    """Least-squares similarity taking paired points `source` [N,3] onto `target` [N,3] (Umeyama 1991)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    mu_s, mu_t = source.mean(0), target.mean(0)
    xs, xt = source - mu_s, target - mu_t
    u, d, vt = np.linalg.svd(xt.T @ xs / len(source))
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection: flip the weakest axis
        sign[2] = -1.0
    rotation = u @ np.diag(sign) @ vt
    variance = (xs ** 2).sum(1).mean()
    scale = float((d * sign).sum() / variance) if with_scale and variance > 0 else 1.0
    return Similarity(scale, rotation, mu_t - scale * rotation @ mu_s)


def nearest_distances(points: np.ndarray, reference: np.ndarray | cKDTree) -> np.ndarray:
    """Distance from each of `points` to the nearest point of `reference` (a cloud or its tree)."""
    tree = reference if isinstance(reference, cKDTree) else cKDTree(np.asarray(reference, np.float64))
    return tree.query(np.asarray(points, np.float64), workers=-1)[0]


@dataclass
class IcpResult:
    transform: Similarity
    iterations: int
    rms: float  # root mean square of the symmetric nearest-neighbor distances after alignment


def icp(source: np.ndarray, target: np.ndarray, init: Similarity | None = None, iterations: int = 50,
        tolerance: float = 1e-5, with_scale: bool = True) -> IcpResult:
    """Align `source` to `target` (clouds of any sizes) by ICP with a similarity transform.

    Correspondences run both ways (each source point to its nearest target point and each
    target point to its nearest source point), so neither cloud can shrink onto part of the
    other. Stops when the mean squared distance improves by less than `tolerance` (relative).
    """
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    target_tree = cKDTree(target)
    transform = init or Similarity()
    previous = math.inf
    done = 0
    for done in range(1, iterations + 1):
        moved = transform.apply(source)
        d_st, to_target = target_tree.query(moved, workers=-1)
        d_ts, to_source = cKDTree(moved).query(target, workers=-1)
        error = float((np.concatenate([d_st, d_ts]) ** 2).mean())
        if math.isfinite(previous) and previous - error <= tolerance * previous:
            break
        previous = error
        transform = umeyama(np.concatenate([source, source[to_source]]),
                            np.concatenate([target[to_target], target]), with_scale)
    moved = transform.apply(source)
    residual = np.concatenate([nearest_distances(moved, target_tree), nearest_distances(target, moved)])
    return IcpResult(transform, done, float(np.sqrt((residual ** 2).mean())))


ICP_POINTS = 5000  # ICP runs on random subsets of this many points of each cloud (the scores use them all)


def align(source: np.ndarray, target: np.ndarray, iterations: int = 50, with_scale: bool = True,
          max_points: int = ICP_POINTS, seed: int = 0) -> IcpResult:
    """Scale estimation, then ICP; also ICP from where `source` already is, keeping the closer of the two."""
    rng = np.random.default_rng(seed)
    subset = lambda x: x if len(x) <= max_points else x[rng.choice(len(x), max_points, replace=False)]  # noqa: E731
    source, target = subset(np.asarray(source, np.float64)), subset(np.asarray(target, np.float64))
    starts = [estimate_scale(source, target) if with_scale else Similarity(), Similarity()]
    results = [icp(source, target, start, iterations, with_scale=with_scale) for start in starts]
    return min(results, key=lambda r: r.rms)


def precision_recall(pred: np.ndarray, gt: np.ndarray, threshold: float = F_SCORE_THRESHOLD) -> tuple[float, float]:
    """Fraction of `pred` within `threshold` of `gt` (precision), and of `gt` within it of `pred` (recall)."""
    if len(pred) == 0 or len(gt) == 0:
        return 0.0, 0.0
    precision = float((nearest_distances(pred, gt) < threshold).mean())
    recall = float((nearest_distances(gt, pred) < threshold).mean())
    return precision, recall


def fscore(pred: np.ndarray, gt: np.ndarray, threshold: float = F_SCORE_THRESHOLD) -> float:
    """Harmonic mean of precision and recall at `threshold` (Tatarchenko et al. 2019), in the clouds' units."""
    return _harmonic(*precision_recall(pred, gt, threshold))


def _harmonic(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)


def chamfer(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer-L1 distance: the mean of the two directions' mean nearest-neighbor distances."""
    return 0.5 * float(nearest_distances(a, b).mean() + nearest_distances(b, a).mean())


@dataclass
class GeometryScore:
    fscore: float
    precision: float
    recall: float
    chamfer: float
    fscore_unaligned: float  # the same, before scale estimation and ICP (the prediction as it was placed)
    chamfer_unaligned: float
    threshold: float
    alignment: IcpResult  # in the normalized frame
    normalization: Similarity  # ground truth's frame -> normalized frame
    fscore_at: dict[str, float] = field(default_factory=dict)  # after alignment, by threshold

    def as_dict(self) -> dict:
        t = self.alignment.transform
        return {"fscore": self.fscore, "precision": self.precision, "recall": self.recall, "chamfer": self.chamfer,
                "fscore_unaligned": self.fscore_unaligned, "chamfer_unaligned": self.chamfer_unaligned,
                "threshold": self.threshold, "fscore_at": self.fscore_at,
                "alignment": {"scale": t.scale, "rotation_deg": t.rotation_deg, "translation": t.translation.tolist(),
                              "matrix": t.matrix().tolist(), "icp_iterations": self.alignment.iterations,
                              "icp_rms": self.alignment.rms},
                "normalization": {"scale": self.normalization.scale,
                                  "translation": self.normalization.translation.tolist()}}


def score_geometry(pred: np.ndarray, gt: np.ndarray, threshold: float = F_SCORE_THRESHOLD,
                   icp_iterations: int = 50) -> GeometryScore:
    """F-score and Chamfer of the cloud `pred` against `gt`, both normalized by the ground truth, after alignment."""
    norm = normalization(gt)
    pred_n, gt_n = norm.apply(pred), norm.apply(gt)
    result = align(pred_n, gt_n, icp_iterations)
    aligned = result.transform.apply(pred_n)
    precision, recall = precision_recall(aligned, gt_n, threshold)
    at = {f"{t:g}": fscore(aligned, gt_n, t) for t in sorted({threshold, *F_SCORE_THRESHOLDS}, reverse=True)}
    return GeometryScore(_harmonic(precision, recall), precision, recall, chamfer(aligned, gt_n),
                         fscore(pred_n, gt_n, threshold), chamfer(pred_n, gt_n), threshold, result, norm, at)


# ----------------------------------------------------------------------------------------------- images


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB; inf for identical images."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)


SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03  # 3.5 sigma: the 11-tap window of Wang et al.


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of two images [H,W] or [H,W,C] (C averaged), Gaussian-weighted windows."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    radius = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if min(a.shape[:2]) < 2 * radius + 1:
        raise ValueError(f"images of {a.shape[:2]} are smaller than the {2 * radius + 1}-pixel SSIM window")
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    blur = lambda x: ndimage.gaussian_filter(x, (SSIM_SIGMA, SSIM_SIGMA, 0), mode="reflect",  # noqa: E731
                                             truncate=SSIM_TRUNCATE)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(index[radius:-radius, radius:-radius].mean())
