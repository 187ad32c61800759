"""CovarianceAccumulator.load on the reference implementation's .npz statistics (ROME/MEMIT
``layer_stats``): read, not refused as "not a safetensors file"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmsolve.errors import CacheError
from pmsolve.stats import CovarianceAccumulator as CA
from pmsolve.stats.io import load_state


def reference_npz(path, d=6, n=40, seed=0):
    """A second-moment file written the way the reference code saves its running statistics
    (np.savez of the state dict: mom2.constructor, mom2.count, mom2.mom2 = Σ x xᵀ in float32)."""
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    total = x.T.astype(np.float64) @ x.astype(np.float64)
    with open(path, "wb") as fh:  # a file object: np.savez keeps the caller's name as it is
        np.savez(fh, **{"mom2.constructor": np.array("rome.runningstats.SecondMoment()"),
                        "mom2.count": np.array(n), "mom2.mom2": total.astype(np.float32),
                        "sample_size": np.array(n)})
    return total, n


@pytest.mark.parametrize("name", ["stats.npz", "layer_stats_mlp.down_proj.bin"])  # judged by content
def test_load_reads_a_reference_npz(tmp_path, name):
    path = tmp_path / name
    total, n = reference_npz(path)
    acc = CA.load(path)
    assert acc.count == n and acc.d == total.shape[0]
    want = torch.from_numpy(total.astype(np.float32).astype(np.float64) / n)
    torch.testing.assert_close(acc.mean(), want, rtol=1e-12, atol=0)
    acc2, meta = CA.load_with_metadata(path)
    assert meta["format"] == "reference-npz" and meta["count"] == str(n)
    torch.testing.assert_close(acc2.mean(), acc.mean(), rtol=0, atol=0)


def test_load_with_expect_on_an_npz_says_what_it_cannot_check(tmp_path):
    reference_npz(tmp_path / "stats.npz")
    with pytest.raises(CacheError, match="reference .npz.*'model_id'.*from_npz"):
        CA.load(tmp_path / "stats.npz", expect={"model_id": "gpt2-xl"})


def test_the_safetensors_reader_points_to_the_npz_readers(tmp_path):
    reference_npz(tmp_path / "stats.npz")
    with pytest.raises(CacheError, match=r"\.npz file.*from_npz") as err:
        load_state(tmp_path / "stats.npz")
    assert "truncated" not in str(err.value)


def test_damaged_files_still_say_so(tmp_path):
    acc = CA(4, backend="torch")
    acc.update(torch.randn(10, 4))
    acc.save(tmp_path / "s.safetensors")
    data = (tmp_path / "s.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="truncated or not a safetensors file"):
        CA.load(tmp_path / "cut.safetensors")
    reference_npz(tmp_path / "whole.npz")
    blob = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(CacheError, match="truncated or not an .npz"):
        CA.load(tmp_path / "cut.npz")
