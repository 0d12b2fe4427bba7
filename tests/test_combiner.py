"""The numpy combiner (serving) equals its torch twin (training), context included, and the
cold paths behave."""

from __future__ import annotations

import numpy as np
import torch

from towers.combiner import CombinerParams, combine
from towers.context import context_term
from towers.encoders import Encoder
from towers.model import ModelConfig, SessionCombiner, to_tensors
from towers.spec import FeatureSpec


def _context_encoders() -> list[Encoder]:
    return [
        Encoder.fit(FeatureSpec(column="device", kind="categorical", oov_buckets=2), ["ios", "web", "ios"]),
        Encoder.fit(FeatureSpec(column="hour", kind="bucketized", derive="hour_of_day"), []),
        Encoder.fit(FeatureSpec(column="price", kind="numeric"), [1.0, 5.0, None, 9.0]),
    ]


def _random_combiner(d: int, n: int, context: list[Encoder] | None = None) -> SessionCombiner:
    torch.manual_seed(0)
    m = SessionCombiner(ModelConfig(dim=d, max_session=n), context)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def test_numpy_combiner_matches_torch() -> None:
    d, n, b = 16, 5, 7
    m = _random_combiner(d, n)
    rng = np.random.default_rng(1)
    user = rng.standard_normal((b, d)).astype(np.float32)
    sess = rng.standard_normal((b, n, d)).astype(np.float32)
    mask = rng.random((b, n)) < 0.6
    mask[0] = False  # no session
    has_user = np.ones(b, dtype=bool)
    has_user[1] = False  # unknown user
    user[1] = 0.0
    sess *= mask[..., None]
    want = m(torch.from_numpy(user), torch.from_numpy(has_user), torch.from_numpy(sess), torch.from_numpy(mask))
    got = combine(m.export(), user, has_user, sess, mask)
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_numpy_combiner_matches_torch_with_context() -> None:
    d, n, b = 16, 5, 8
    encs = _context_encoders()
    m = _random_combiner(d, n, encs)
    rng = np.random.default_rng(3)
    user = rng.standard_normal((b, d)).astype(np.float32)
    sess = rng.standard_normal((b, n, d)).astype(np.float32)
    mask = rng.random((b, n)) < 0.6
    mask[0] = False  # no session
    mask[2] = False
    has_user = np.ones(b, dtype=bool)
    has_user[1] = has_user[2] = False  # 2: neither user nor session
    user[~has_user] = 0.0
    sess *= mask[..., None]
    ctx = {"device": encs[0].transform(["ios", "web", None, "tv", "ios", "web", "web", "ios"]),
           "hour": encs[1].transform([0, 3, 7, 12, 13, 23, 5, 18]),
           "price": encs[2].transform([1.0, None, 4.0, 9.0, 2.0, None, 7.5, 0.0])}
    want = m(torch.from_numpy(user), torch.from_numpy(has_user), torch.from_numpy(sess), torch.from_numpy(mask),
             to_tensors(ctx)).detach().numpy()
    p = m.export()
    assert set(p.context) == {"device", "hour", "price"}
    p = CombinerParams.from_arrays(p.arrays())  # through the bundle's named arrays
    got = combine(p, user, has_user, sess, mask, context_term(p, ctx))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[2] == 0.0)  # context alone is no query
    assert not np.allclose(got, combine(p, user, has_user, sess, mask), atol=1e-3)  # context moved the queries


def test_fresh_context_tables_are_zero_so_an_untrained_model_ignores_context() -> None:
    m = SessionCombiner(ModelConfig(dim=8, max_session=3), _context_encoders())
    p = m.export()
    assert all(np.all(a == 0.0) for a in p.context.values())
    assert [a.shape for a in p.context.values()] == [(4, 8), (25, 8), (2, 8)]  # 2 known + 2 OOV; 24 hours + missing


def test_cold_paths() -> None:
    d, n = 8, 4
    p = _random_combiner(d, n).export()
    rng = np.random.default_rng(2)
    user = rng.standard_normal((3, d)).astype(np.float32)
    sess = rng.standard_normal((3, n, d)).astype(np.float32)
    mask = np.array([[False] * n, [True, True, False, False], [False] * n])
    has_user = np.array([True, False, False])
    user[1:] = 0.0
    q = combine(p, user, has_user, sess * mask[..., None], mask)
    np.testing.assert_allclose(q[0], user[0] / np.linalg.norm(user[0]), rtol=1e-5)  # no session: the user alone
    assert abs(np.linalg.norm(q[1]) - 1.0) < 1e-5  # unknown user with a session: session-only query
    assert np.all(q[2] == 0.0)  # neither: no query (the caller serves popularity)
