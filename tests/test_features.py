"""Feature pipeline: JSON round trip, OOV buckets, unknown values never crash."""

from __future__ import annotations

import json

import numpy as np

from offline.datasets import Dataset
from offline.train import fit_pipeline
from towers.features import FeaturePipeline, Vocabulary, bucketize


def test_round_trip_gives_identical_transforms(ml100k: Dataset) -> None:
    fp = fit_pipeline(ml100k)
    fp2 = FeaturePipeline.loads(fp.dumps())
    users = ["1", "500", "nobody"]
    items = ["1", "1682", "ghost"]
    pairs = [(fp.user_features(users), fp2.user_features(users)), (fp.item_features(items), fp2.item_features(items))]
    for a, b in pairs:
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    json.loads(fp.dumps())  # plain JSON, no pickle


def test_unknown_values_land_in_oov_buckets(ml100k: Dataset) -> None:
    fp = fit_pipeline(ml100k)
    uf = fp.user_features(["nobody", "1"])
    assert uf["user"][0] == len(fp.user_vocab)  # the OOV row, past the known users
    assert uf["user"][1] < len(fp.user_vocab)
    assert uf["age"][0] == 0  # unknown age bucket
    enc = {e.name: e for e in fp.user_encoders}
    for k in ("gender", "occupation", "zip_code"):
        vocab = enc[k].vocab
        assert vocab is not None and len(vocab) <= uf[k][0] < vocab.size
    itf = fp.item_features(["ghost"])
    assert itf["item"][0] == len(fp.item_vocab) and itf["class"].sum() == 0 and itf["release_year"][0] == 0
    assert fp.item_vocab.positions(["ghost", "1"]).tolist() == [-1, fp.item_vocab.known("1")]


def test_vocabulary_hashes_oov_deterministically() -> None:
    v = Vocabulary.fit(["b", "a", "a"], n_oov=3)
    assert v.values == ["a", "b"] and v.size == 5
    x, y = v.lookup(["zzz", "zzz"])
    assert x == y and 2 <= x < 5


def test_bucketize() -> None:
    assert bucketize(np.array([-1, 10, 18, 30, 99]), (18, 25, 35)).tolist() == [0, 1, 2, 3, 4]
