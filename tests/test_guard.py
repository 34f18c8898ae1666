import numpy as np
import pytest
import torch

from pneumoscan import guard


def test_pooling_is_the_mean_and_std_of_each_channel() -> None:
    features = torch.arange(2 * 112 * 16, dtype=torch.float32).view(2, 112, 4, 4)
    pooled = guard.Guard.pool(features)
    assert pooled.shape == (2, guard.FEATURES)
    flat = features.flatten(2)
    assert torch.equal(pooled[:, :112], flat.mean(2)) and torch.equal(pooled[:, 112:], flat.std(2))


def test_the_fitted_guard_passes_its_own_kind_and_flags_what_lies_far_away() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(600, guard.FEATURES)).astype(np.float32)
    val = rng.normal(size=(300, guard.FEATURES)).astype(np.float32)
    fitted, threshold, pass_rate = guard.fit(train, val)
    assert pass_rate >= 0.99 and threshold > 0
    with torch.no_grad():
        centre = fitted.distance(fitted.mean[None])
        far = fitted.distance(torch.from_numpy(val + 3.0))
    assert centre.item() == pytest.approx(0.0, abs=1e-3)
    assert (far > threshold).all()  # every shifted point is flagged


def test_the_distance_is_mahalanobis_under_the_fitted_covariance() -> None:
    """A guard with a diagonal precision: the distance by hand."""
    g = guard.Guard()
    g.precision.copy_(torch.diag(torch.full((guard.FEATURES,), 4.0)))
    point = torch.zeros(1, guard.FEATURES)
    point[0, :9] = 1.0
    assert g.distance(point).item() == pytest.approx(6.0)  # sqrt(9 * 4)
