"""CovarianceAccumulator: accuracy against fp64, merging, state and files (issue #3)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pmsolve._native import native
from pmsolve.errors import BackendUnavailableError, CacheError, InputError
from pmsolve.stats import CovarianceAccumulator as CA
from pmsolve.stats import read_reference_npz

HAS_NATIVE = native() is not None and hasattr(native(), "CovAccumulator")
needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="pmsolve._C with CovAccumulator not built")
BACKENDS = [pytest.param("native", marks=needs_native), "torch"]


def mlp_like(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """GELU of shifted, per-feature-scaled heavy-tailed pre-activations: non-negative-ish, a few large values."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.7 * torch.randn(d, generator=g))
    shift = -0.5 + 0.5 * torch.randn(d, generator=g)
    z = torch.randn(n, d, generator=g) / torch.rand(n, d, generator=g).clamp_min(0.05).sqrt()  # heavier tails
    return torch.nn.functional.gelu(z * scale + shift)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double()))


def truth(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x.T @ x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("products,tol", [("fp32", 3e-7), ("fp64", 1e-13)])
def test_sum_matches_fp64_truth(backend, products, tol, f32_path):
    x = mlp_like(5000, 96)
    acc = CA(96, dtype_products=products, backend=backend, chunk_rows=700)  # chunks with a remainder
    for part in torch.split(x, 1234):
        acc.update(part)
    assert acc.engine == backend
    assert acc.count == 5000
    assert rel(acc.sum(), truth(x)) < tol
    C = acc.mean()
    assert C.dtype == torch.float64 and torch.equal(C, C.T)
    assert rel(C, truth(x) / 5000) < tol


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_error_does_not_grow_with_tokens(backend, f32_path):
    # The reference accumulates into an fp32 matrix: its error grows with the number of batches.
    d, batch = 48, 64
    x = mlp_like(256 * batch, d, seed=1)
    acc = CA(d, backend=backend, chunk_rows=batch)
    ref = torch.zeros(d, d)
    for part in torch.split(x, batch):
        acc.update(part)
        ref += part.T @ part
    ours, theirs = rel(acc.sum(), truth(x)), rel(ref, truth(x))
    first = CA(d, backend=backend, chunk_rows=batch)
    first.update(x[:batch])
    one_chunk = rel(first.sum(), truth(x[:batch]))
    assert ours < 2e-7 and ours <= 1.5 * one_chunk
    assert theirs > 5 * ours, (theirs, ours)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("products,tol", [("fp32", 3e-7), ("fp64", 1e-12)])
def test_centered_statistics(backend, products, tol):
    x = mlp_like(3000, 40, seed=2) + 100.0  # a large mean: naive Σxxᵀ/n − μμᵀ would cancel catastrophically
    acc = CA(40, dtype_products=products, centered=True, backend=backend, chunk_rows=512)
    for part in torch.split(x, 999):
        acc.update(part)
    xd = x.double()
    mu = xd.mean(0)
    cov = (xd - mu).T @ (xd - mu) / 3000
    assert torch.allclose(acc.mean_vector(), mu, rtol=1e-12, atol=0)
    assert rel(acc.covariance(), cov) < tol
    assert rel(acc.sum(), truth(x)) < 1e-7


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_convert_exactly(dtype):
    x = mlp_like(777, 33, seed=3).to(dtype)
    if dtype == torch.float16:
        x[0, :5] = torch.tensor([6e-8, 1e-6, -3e-5, 65504.0, -0.0], dtype=dtype)  # subnormals, max, signed zero
    a, b = CA(33, backend="native"), CA(33, backend="native")
    # The conversion is under test: bf16 must take the same ssyrk as fp32, not a bf16 kernel, and
    # fp32 not the AVX-512 one (their summation orders differ; tests/test_bf16_gram.py and
    # tests/test_f32_gram.py bound those).
    from pmsolve._native import native

    names = ("amx_bf16", "dpbf16_bf16", "f32_gram")
    switches = [getattr(native(), name) for name in names if hasattr(native(), name)]
    before = [switch() for switch in switches]
    for switch in switches:
        switch(False)
    try:
        a.update(x)
        b.update(x.float())
    finally:
        for switch, on in zip(switches, before):
            switch(on)
    assert torch.equal(a.sum(), b.sum())


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("products,tol", [("fp32", 3e-7), ("fp64", 1e-12)])
def test_merge_of_shards_equals_one_pass(centered, products, tol):
    x = mlp_like(4000, 32, seed=4) + (3.0 if centered else 0.0)
    backends = ["native", "torch", "native"] if HAS_NATIVE else ["torch"] * 3
    whole = CA(32, dtype_products=products, centered=centered, backend="torch")
    whole.update(x)
    shards = [CA(32, dtype_products=products, centered=centered, backend=b) for b in backends]
    for acc, part in zip(shards, torch.tensor_split(x, 3)):
        acc.update(part)
    merged = CA(32, dtype_products=products, centered=centered)
    for acc in shards:
        merged.merge(acc)
    assert merged.count == whole.count == 4000
    assert rel(merged.sum(), whole.sum()) < tol
    if centered:
        assert rel(merged.covariance(), whole.covariance()) < tol


def test_merge_rejects_incompatible():
    a = CA(8)
    with pytest.raises(InputError, match="d=9"):
        a.merge(CA(9))
    with pytest.raises(InputError, match="centered"):
        a.merge(CA(8, centered=True))
    with pytest.raises(InputError, match="itself"):
        a.merge(a)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_updates(backend):
    acc = CA(8, backend=backend)
    with pytest.raises(InputError, match=r"\[\.\.\., 8\]"):
        acc.update(torch.zeros(3, 7))
    with pytest.raises(InputError, match="floating"):
        acc.update(torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(InputError, match="no rows"):
        acc.mean()
    good = mlp_like(10, 8)
    acc.update(good)
    for dtype, bad_value in ((torch.float32, float("nan")), (torch.bfloat16, float("inf")), (torch.float16, -float("inf"))):
        bad = torch.ones(4, 8, dtype=dtype)
        bad[2, 5] = bad_value
        with pytest.raises(InputError, match="NaN or Inf.*row 2"):
            acc.update(bad)
    assert acc.count == 10 and torch.equal(acc.sum(), CA(8, backend="torch").merge(acc).sum())  # nothing added
    assert rel(acc.sum(), truth(good)) < 1e-6
    for kwargs in ({"dtype_products": "bf16"}, {"backend": "gpu"}, {"chunk_rows": 0}):
        with pytest.raises(InputError):
            CA(8, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rejected_updates_add_nothing_whatever_the_path(backend, f32_path):
    """A NaN/Inf anywhere in a batch, in its first or its last chunk, with fp32, fp64 or centred
    products, and fp32 squares that overflow: an error naming the problem, the state unchanged.
    (The native fp32 path checks a one-chunk batch on its product's diagonal, the others up front.)"""
    good = mlp_like(10, 8)
    for kwargs in ({}, {"dtype_products": "fp64"}, {"centered": True}, {"chunk_rows": 3}):
        acc = CA(8, backend=backend, **kwargs)
        acc.update(good)
        before = acc.state_dict()
        for row in (0, 5):  # with chunk_rows=3: the first and the second chunk
            bad = mlp_like(6, 8, seed=1)
            bad[row, 7] = float("nan")
            with pytest.raises(InputError, match=f"NaN or Inf.*row {row} of 6"):
                acc.update(bad)
        huge = torch.full((4, 8), 3e19)  # finite in fp32, but 4 · (3e19)² > 3.4e38
        if kwargs.get("dtype_products") == "fp64":
            acc.update(huge)  # fp64 products hold it
            continue
        if not kwargs.get("centered"):  # (centred products of equal rows are zero)
            with pytest.raises(InputError, match="too large for fp32 products"):
                acc.update(huge)
        after = acc.state_dict()
        assert after["count"] == before["count"] == 10 and torch.equal(after["sum"], before["sum"]), kwargs
    acc = CA(8, backend=backend)
    acc.update(torch.full((3, 8), 1e19))  # 3 · 1e38 < 3.4e38: still representable, accepted
    assert torch.isfinite(acc.sum()).all()


@needs_native
def test_native_binding_checks():
    acc = native().CovAccumulator(4)
    with pytest.raises(TypeError, match="float32"):
        acc.update(np.zeros((2, 4), dtype=np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        acc.update(np.zeros((4, 8), dtype=np.float32)[:, ::2])
    with pytest.raises(ValueError, match="d = 4"):
        acc.update(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(TypeError, match="16-bit"):
        acc.update(np.zeros((2, 4), dtype=np.float32), "bf16")
    with pytest.raises(ValueError, match="centred state needs"):
        native().CovAccumulator(4, centered=True).set_state(1, np.eye(4))
    # results into a given buffer: the same values as a new array; wrong buffers refused
    rng = np.random.default_rng(0)
    for centered, get in ((False, "second_moment_sum"), (True, "centered_m2")):
        acc = native().CovAccumulator(4, centered=centered)
        acc.update(rng.standard_normal((9, 4)).astype(np.float32))
        out = np.full((4, 4), np.nan)
        assert getattr(acc, get)(out=out) is not None and np.array_equal(out, getattr(acc, get)())
        for bad in (np.zeros((4, 5)), np.zeros((4, 4), dtype=np.float32), np.zeros((4, 8))[:, ::2]):
            with pytest.raises((ValueError, TypeError), match="out must"):
                getattr(acc, get)(out=bad)


def test_native_requested_but_missing(monkeypatch):
    import pmsolve.stats.accumulator as mod

    monkeypatch.setattr(mod, "native", lambda: None)
    with pytest.raises(BackendUnavailableError):
        CA(4, backend="native")
    with pytest.warns(Warning, match="torch accumulator"):
        monkeypatch.setattr(mod, "_warned_fallback", False)
        acc = CA(4)
        acc.update(torch.ones(2, 4))
    assert acc.engine == "torch"


@pytest.mark.parametrize("centered", [False, True])
def test_state_dict_round_trip_continues_exactly(centered):
    x = mlp_like(3000, 16, seed=5)
    a = CA(16, centered=centered)
    a.update(x[:1500])
    b = CA(16, centered=centered, backend="torch")
    b.load_state_dict(a.state_dict())
    a.update(x[1500:])
    b.update(x[1500:])
    assert b.count == a.count == 3000
    assert rel(b.sum(), a.sum()) < 1e-7


def test_save_load_and_damaged_files(tmp_path):
    acc = CA(24, centered=True)
    acc.update(mlp_like(500, 24, seed=6))
    path = tmp_path / "s.safetensors"
    acc.save(path, metadata={"layer": 4, "model_id": "m"})
    back = CA.load(path, expect={"layer": 4, "model_id": "m"})
    assert back.count == 500 and back.centered
    assert torch.equal(back.sum(), acc.sum())
    assert torch.equal(back.covariance(), acc.covariance())
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind

    with pytest.raises(CacheError, match="layer is '4' in the file, expected '5'"):
        CA.load(path, expect={"layer": 5})
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match="truncated"):
        CA.load(tmp_path / "trunc.safetensors")
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # inside the tensor data, past the header
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CacheError, match="checksum"):
        CA.load(tmp_path / "flip.safetensors")
    with pytest.raises(CacheError, match="does not exist"):
        CA.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(CacheError):
        CA.load(tmp_path / "junk.safetensors")


def test_reference_npz_both_ways(tmp_path):
    x = mlp_like(800, 20, seed=7)
    acc = CA(20)
    acc.update(x)
    ours = tmp_path / "layer-4.npz"
    acc.to_npz(ours, sample_size=100000)
    with np.load(ours, allow_pickle=False) as z:  # what the reference loader reads
        assert z["mom2.mom2"].dtype == np.float32 and int(z["mom2.count"]) == 800
        assert str(z["mom2.constructor"]) == "util.runningstats.SecondMoment()"
        assert int(z["sample_size"]) == 100000
        assert rel(torch.from_numpy(z["mom2.mom2"]), truth(x)) < 1e-6

    # A file laid out as the reference's np.savez(CombinedStat(mom2=SecondMoment()).state_dict()) writes it.
    theirs = tmp_path / "ref.npz"
    mom2 = (x.T @ x).numpy()
    np.savez(theirs, **{"mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                        "mom2.count": np.array(800), "mom2.mom2": mom2, "sample_size": np.array(100000)})
    back = CA.from_npz(theirs)
    assert back.count == 800 and rel(back.sum(), torch.from_numpy(mom2)) == 0.0

    np.savez(tmp_path / "other.npz", mean=np.zeros(3))
    with pytest.raises(CacheError, match="mom2.mom2"):
        read_reference_npz(tmp_path / "other.npz")
    data = theirs.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 3])
    with pytest.raises(CacheError, match="truncated"):
        read_reference_npz(tmp_path / "trunc.npz")


@needs_native
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc to read the RSS")
def test_accumulators_share_one_chunk_scratch():
    """Every accumulator keeps its d × d fp64 master, but the per-chunk scratch (up to one d × d
    fp32 product per thread) is one for the process: five accumulators at d = 2048 grow the RSS by
    ~5 masters + 1 scratch (192 MiB with two threads), where a scratch each would make it 240–320
    MiB. The last accumulator's end frees the scratch; the next one starts a new one and works."""
    d, rows = 2048, 4096
    x = torch.randn(rows, d)
    master, scratch = d * d * 8, 2 * d * d * 4  # scratch: at most two threads' products

    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    accs = []
    for _ in range(5):
        acc = CA(d, backend="native")
        acc.update(x)
        accs.append(acc)
    grown = rss() - before
    assert grown < 5 * master + 2 * scratch, grown / 2**20
    expected = truth(x)
    assert all(rel(acc.mean() * acc.count, expected) < 3e-7 for acc in accs)
    del accs, acc
    again = CA(d, backend="native")
    again.update(x)
    assert rel(again.mean() * again.count, expected) < 3e-7
