"""The numpy combiner (serving) equals its torch twin (training), and the cold paths behave."""

from __future__ import annotations

import numpy as np
import torch

from towers.combiner import combine
from towers.model import ModelConfig, SessionCombiner


def _random_combiner(d: int, n: int) -> SessionCombiner:
    torch.manual_seed(0)
    m = SessionCombiner(ModelConfig(dim=d, max_session=n))
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
