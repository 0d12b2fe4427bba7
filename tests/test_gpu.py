"""The GPU FAISS path (bench/gpu_check.py): runs only where ``faiss.get_num_gpus() > 0``."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from towers import index as faiss_index

needs_gpu = pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="no GPU (faiss.get_num_gpus() == 0)")


def test_without_a_gpu_the_cpu_index_is_kept() -> None:
    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is present")
    spec = faiss_index.IndexSpec("flat")
    cpu = faiss_index.build(np.eye(8, dtype=np.float32), spec)
    same, on_gpu = faiss_index.to_gpu(cpu, spec)
    assert same is cpu and not on_gpu


@needs_gpu
def test_gpu_check_builds_searches_and_matches_the_cpu(tmp_path: Path) -> None:
    import json

    from bench.gpu_check import main

    out = tmp_path / "gpu.json"
    assert main(["--items", "50000", "--queries", "200", "--seconds", "0.5", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["indexes"]
    assert all(r["on_gpu"] and r["same_within_tolerance"] for r in rows.values())
