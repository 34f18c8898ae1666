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
        centre = fitted.distance(fitted.mean)
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


def test_several_populations_each_have_their_gaussian_and_threshold() -> None:
    """Two populations and a reference: each image is most like the nearest, relative to each
    population's own threshold, and one most like the reference is never in domain."""
    from pneumoscan import domain

    rng = np.random.default_rng(0)

    def cloud(centre: float, n: int) -> np.ndarray:
        return (rng.normal(size=(n, guard.FEATURES)) + centre).astype(np.float32)

    sets = {
        "children": (cloud(0, 600), cloud(0, 200), True),
        "adults": (cloud(4, 600), cloud(4, 200), True),
        "elsewhere": (cloud(-4, 600), cloud(-4, 200), False),
    }
    fitted, populations = guard.fit_populations(sets)
    assert [p.name for p in populations] == list(sets) and all(
        p.pass_rate >= 0.99 for p in populations
    )
    ood = {"populations": [p.to_dict() for p in populations], "outer_ratio": 2.0}
    with torch.no_grad():
        distances = fitted.distance(
            torch.from_numpy(np.concatenate([cloud(0, 5), cloud(4, 5), cloud(-4, 5), cloud(40, 5)]))
        )
    assert distances.shape == (20, 3)
    tiers, nearest, scores = domain.assess(distances.numpy(), ood)
    assert nearest[:15] == ["children"] * 5 + ["adults"] * 5 + ["elsewhere"] * 5
    assert tiers[:10] == [domain.IN_DOMAIN] * 10
    assert tiers[10:15] == [domain.SHIFTED] * 5  # like a reference population: never in domain
    assert tiers[15:] == [domain.NOT_CHEST_XRAY] * 5 and (scores[15:] > 2).all()


def test_a_guard_saved_with_one_population_loads() -> None:
    """Guards saved before populations hold (F,) and (F, F) tensors."""
    g = guard.Guard()
    g.load_state_dict({"mean": torch.ones(guard.FEATURES), "precision": torch.eye(guard.FEATURES)})
    assert g.mean.shape == (1, guard.FEATURES)
    assert g.distance(torch.ones(2, guard.FEATURES)).tolist() == [0.0, 0.0]
