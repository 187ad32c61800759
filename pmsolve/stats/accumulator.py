"""CovarianceAccumulator: streaming, mergeable second moments of MLP keys.

Two engines compute the same thing:

- native (``pmsolve._C.CovAccumulator``, CPU): per-chunk ``ssyrk`` of one triangle
  in fp32 (or ``dsyrk``), added into an fp64 master;
- torch (any device, the fallback and the test oracle): per-chunk fp32 (or fp64)
  product added into an fp64 master on the tensor's device.

Either way the fp32 rounding error is that of one chunk and does not grow with
the token count (the reference's fp32 running sum does). Centred statistics keep
(count, mean, M2) and merge with Chan et al.'s pairwise formula.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch

from .._native import native, unavailable_reason
from ..errors import BackendUnavailableError, CacheError, InputError, NativeUnavailableWarning

ProductDtype = Literal["fp32", "fp64"]
_PRODUCT_DTYPES = ("fp32", "fp64")
_FP32_MAX = float(torch.finfo(torch.float32).max)
# Rows per fp32 product in the torch engine; the native default lives in csrc/accumulate.h.
TORCH_CHUNK_ROWS = 4096


class _TorchEngine:
    """fp32 (or fp64) product per chunk, fp64 master; full GEMM (torch has no syrk).

    On a GPU, cuBLAS's Ssyrk (half the flops, tried through _C) ran 1.44x faster at
    d = 6400 and no faster at 1536 on an H200, with 2-8x this GEMM's error against fp64
    (2.3e-7 vs 1.2e-7 at d = 6400, 3.4e-7 vs 5.2e-8 at d = 700): not worth it
    (docs/history.md, "GPU")."""

    name = "torch"

    def __init__(self, d: int, fp64: bool, centered: bool, device: torch.device, chunk_rows: int) -> None:
        self.d, self.fp64, self.centered, self.chunk_rows = d, fp64, centered, chunk_rows
        self.count = 0
        self.mat = torch.zeros(d, d, dtype=torch.float64, device=device)  # Σxxᵀ, or M2 when centred
        self.mean = torch.zeros(d, dtype=torch.float64, device=device) if centered else None

    def update(self, x: torch.Tensor) -> None:
        amax = float(torch.linalg.vector_norm(x, float("inf")))  # NaN if any NaN, inf if any inf
        if not math.isfinite(amax):
            row = int((~torch.isfinite(x)).any(1).nonzero()[0])
            raise InputError(f"keys contain NaN or Inf (row {row} of {x.shape[0]})")
        if not (self.fp64 or self.centered) and amax * amax * min(x.shape[0], self.chunk_rows) > _FP32_MAX:
            # Only then the exact test: does some column's sum of squares leave the fp32 range?
            sq = x.to(torch.float64).square()
            if any(float(sq[i : i + self.chunk_rows].sum(0).max()) > _FP32_MAX
                   for i in range(0, x.shape[0], self.chunk_rows)):
                raise InputError("keys too large for fp32 products (overflow: a column's sum of squares exceeds "
                                 "the fp32 range; values above ~1e19); use fp64 products")
        # bf16/fp16 rows are upcast before the product, on a GPU too: cuBLAS's bf16 GEMM
        # with an fp32 result (tensor cores) ran 8x faster on an H200 but its error against
        # fp64 was 7e-6, against 3e-8 for this fp32 product (docs/history.md, "GPU").
        x = x.to(self.mat.device, torch.float32)
        for i in range(0, x.shape[0], self.chunk_rows):
            self._chunk(x[i : i + self.chunk_rows])

    def _chunk(self, a: torch.Tensor) -> None:
        work = torch.float64 if self.fp64 else torch.float32
        if not self.centered:
            a = a.to(work)
            self.mat += (a.mT @ a).to(torch.float64)
            self.count += a.shape[0]
            return
        # Centre on the chunk's own fp64 mean, round once, then merge (same as csrc/accumulate.cpp).
        m = a.to(torch.float64).mean(0)
        c = (a.to(torch.float64) - m).to(work)
        self.fold(a.shape[0], m, (c.mT @ c).to(torch.float64))

    def fold(self, n_b: int, mean_b: torch.Tensor | None, mat_b: torch.Tensor) -> None:
        """Chan/Pébay merge of (n_b, mean_b, M2_b) (centred) or a plain sum (uncentred)."""
        if n_b == 0:
            return
        mat_b = mat_b.to(self.mat.device, torch.float64)
        if self.centered:
            mean_b = mean_b.to(self.mat.device, torch.float64)
            n = self.count + n_b
            delta = mean_b - self.mean
            self.mat += mat_b + torch.outer(delta, delta) * (self.count * n_b / n)
            self.mean += delta * (n_b / n)
        else:
            self.mat += mat_b
        self.count += n_b

    def state(self) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        return self.count, self.mat.clone(), None if self.mean is None else self.mean.clone()

    def set_state(self, count: int, mat: torch.Tensor, mean: torch.Tensor | None) -> None:
        self.count = count
        self.mat = mat.to(self.mat.device, torch.float64).clone()
        if self.centered:
            self.mean = mean.to(self.mat.device, torch.float64).clone()


class _NativeEngine:
    """Wraps pmsolve._C.CovAccumulator (CPU tensors; bf16/fp16 passed as raw words)."""

    name = "native"

    def __init__(self, mod: Any, d: int, fp64: bool, centered: bool, chunk_rows: int | None) -> None:
        self.acc = mod.CovAccumulator(d, fp64_products=fp64, centered=centered, chunk_rows=chunk_rows or 0)
        self.centered = centered

    @property
    def count(self) -> int:
        return self.acc.count

    def update(self, x: torch.Tensor) -> None:
        x = x.to("cpu")
        try:  # the native side checks finiteness (much faster than torch.isfinite on CPU)
            if x.dtype in (torch.bfloat16, torch.float16):
                fmt = "bf16" if x.dtype == torch.bfloat16 else "f16"
                self.acc.update(x.contiguous().view(torch.int16).numpy(), fmt)
            else:
                self.acc.update(x.to(torch.float32).contiguous().numpy(), "f32")
        except ValueError as exc:
            if str(exc).startswith("non-finite"):
                raise InputError(f"keys contain NaN or Inf ({str(exc)[len('non-finite value (NaN/Inf) in '):]} of "
                                 f"{x.shape[0]})") from None
            if str(exc).startswith("overflow"):
                raise InputError(f"keys too large for fp32 products ({exc})") from None
            raise

    def fold(self, n_b: int, mean_b: torch.Tensor | None, mat_b: torch.Tensor) -> None:
        other = type(self.acc)(self.acc.d, fp64_products=True, centered=self.centered)
        other.set_state(n_b, _np(mat_b), None if mean_b is None else _np(mean_b))
        self.acc.merge(other)

    def state(self) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        # Into torch's memory, not a new numpy array: torch asks for huge pages, which makes the
        # first touch of a large d × d result several times cheaper on some VMs (docs/design.md §10).
        mat = torch.empty((self.acc.d, self.acc.d), dtype=torch.float64)
        (self.acc.centered_m2 if self.centered else self.acc.second_moment_sum)(out=mat.numpy())
        mean = self.acc.mean_vector()
        return self.acc.count, mat, None if mean is None else torch.from_numpy(mean)

    def set_state(self, count: int, mat: torch.Tensor, mean: torch.Tensor | None) -> None:
        self.acc.set_state(count, _np(mat), None if mean is None else _np(mean))


def _np(t: torch.Tensor) -> Any:
    return t.detach().to("cpu", torch.float64).contiguous().numpy()


_warned_fallback = False


def _resolve_native(backend: str) -> Any | None:
    """The native module for backend "auto"/"native", or None for the torch engine."""
    global _warned_fallback
    if backend == "torch":
        return None
    mod = native()
    if mod is not None and hasattr(mod, "CovAccumulator"):
        return mod
    reason = unavailable_reason() or "this build of pmsolve._C has no CovAccumulator"
    if backend == "native":
        raise BackendUnavailableError(f"native covariance accumulator unavailable: {reason}")
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"pmsolve.stats: using the torch accumulator: {reason}", NativeUnavailableWarning, stacklevel=3)
    return None


class CovarianceAccumulator:
    """Running Σ xxᵀ (and optionally the centred M2) of d-dimensional rows, in fp64.

    Args:
        d: feature width (the rewrite module's input width).
        dtype_products: "fp32" (fast; error that of one chunk, ~1e-7 relative) or "fp64".
        centered: also keep the running mean and centred M2 (Chan/Pébay).
        backend: "auto" (native on CPU when it loads, torch otherwise or for other
            devices), "native" (CPU only, error if missing) or "torch".
        chunk_rows: rows per fp32 product (None: the engine's default).

    The engine is chosen at the first :meth:`update` from the tensor's device.
    """

    def __init__(
        self,
        d: int,
        *,
        dtype_products: ProductDtype = "fp32",
        centered: bool = False,
        backend: Literal["auto", "native", "torch"] = "auto",
        chunk_rows: int | None = None,
    ) -> None:
        if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
            raise InputError(f"d must be a positive int, got {d!r}")
        if dtype_products not in _PRODUCT_DTYPES:
            raise InputError(f"dtype_products must be one of {_PRODUCT_DTYPES}, got {dtype_products!r}")
        if backend not in ("auto", "native", "torch"):
            raise InputError(f"backend must be 'auto', 'native' or 'torch', got {backend!r}")
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows <= 0):
            raise InputError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        self.d, self.dtype_products, self.centered, self.backend = d, dtype_products, centered, backend
        self.chunk_rows = chunk_rows
        self._engine: _TorchEngine | _NativeEngine | None = None
        if backend == "native":
            self._engine_for(torch.device("cpu"))

    # -- engine ---------------------------------------------------------------

    def _engine_for(self, device: torch.device) -> _TorchEngine | _NativeEngine:
        if self._engine is None:
            fp64 = self.dtype_products == "fp64"
            mod = _resolve_native(self.backend) if device.type == "cpu" else None
            if device.type != "cpu" and self.backend == "native":
                raise InputError(f"backend 'native' runs on CPU tensors, got a tensor on {device}")
            if mod is not None:
                self._engine = _NativeEngine(mod, self.d, fp64, self.centered, self.chunk_rows)
            else:
                self._engine = _TorchEngine(self.d, fp64, self.centered, device, self.chunk_rows or TORCH_CHUNK_ROWS)
        return self._engine

    @property
    def engine(self) -> str | None:
        """"native" or "torch" once the first update chose it, else None."""
        return None if self._engine is None else self._engine.name

    # -- accumulate -----------------------------------------------------------

    def update(self, keys: torch.Tensor) -> None:
        """Add rows ``keys[..., d]`` (any float dtype, any device)."""
        if not isinstance(keys, torch.Tensor):
            raise InputError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
        if not keys.is_floating_point():
            raise InputError(f"keys must have a floating dtype, got {keys.dtype}")
        if keys.ndim == 0 or keys.shape[-1] != self.d:
            raise InputError(f"keys must have shape [..., {self.d}], got {tuple(keys.shape)}")
        x = keys.detach().reshape(-1, self.d)
        if x.shape[0] == 0:
            return
        self._engine_for(x.device).update(x)

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add ``other``'s rows to this accumulator (exact: sums add; centred states merge by Chan/Pébay)."""
        if not isinstance(other, CovarianceAccumulator):
            raise InputError(f"can only merge a CovarianceAccumulator, got {type(other).__name__}")
        if other is self:
            raise InputError("cannot merge an accumulator with itself")
        if other.d != self.d or other.centered != self.centered:
            raise InputError(
                f"cannot merge (d={other.d}, centered={other.centered}) into (d={self.d}, centered={self.centered})"
            )
        if other._engine is None or other.count == 0:
            return self
        mine, theirs = self._engine, other._engine
        if isinstance(mine, _NativeEngine) and isinstance(theirs, _NativeEngine):
            mine.acc.merge(theirs.acc)
            return self
        count, mat, mean = theirs.state()
        device = mat.device if mine is None else self._engine_device()
        self._engine_for(device).fold(count, mean, mat)
        return self

    def _engine_device(self) -> torch.device:
        return self._engine.mat.device if isinstance(self._engine, _TorchEngine) else torch.device("cpu")

    # -- results --------------------------------------------------------------

    @property
    def count(self) -> int:
        return 0 if self._engine is None else int(self._engine.count)

    def sum(self) -> torch.Tensor:
        """Σ xxᵀ, full symmetric d × d fp64 (on CPU for the native engine)."""
        count, mat, mean = self._state()
        if self.centered:
            return mat + count * torch.outer(mean, mean)
        return mat

    def mean(self) -> torch.Tensor:
        """C = Σ xxᵀ / count: the uncentred second moment the solver uses (fp64, symmetric)."""
        self._require_rows()
        return self.sum() / self.count

    def mean_vector(self) -> torch.Tensor:
        """Mean of the rows (centred mode)."""
        self._require_centered()
        self._require_rows()
        return self._state()[2]

    def covariance(self, unbiased: bool = False) -> torch.Tensor:
        """Centred covariance M2 / (count − unbiased) (centred mode)."""
        self._require_centered()
        self._require_rows()
        return self._state()[1] / (self.count - (1 if unbiased else 0))

    def _state(self) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        if self._engine is None:
            z = torch.zeros(self.d, self.d, dtype=torch.float64)
            return 0, z, torch.zeros(self.d, dtype=torch.float64) if self.centered else None
        count, mat, mean = self._engine.state()
        # The torch engine keeps the lower triangle as exactly as the native one but fills both
        # halves from a full GEMM: symmetrise so both engines hand out the same kind of matrix.
        return count, (mat + mat.mT) / 2, mean

    def _require_rows(self) -> None:
        if self.count == 0:
            raise InputError("no rows accumulated yet")

    def _require_centered(self) -> None:
        if not self.centered:
            raise InputError("centred statistics were not collected (create with centered=True)")

    # -- state ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (CPU): count, sum and, when centred, mean and m2."""
        count, mat, mean = self._state()
        state: dict[str, Any] = {
            "d": self.d,
            "count": count,
            "dtype_products": self.dtype_products,
            "centered": self.centered,
            "sum": (mat + count * torch.outer(mean, mean) if self.centered else mat).cpu(),
        }
        if self.centered:
            state["mean"], state["m2"] = mean.cpu(), mat.cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this accumulator's state (checks d and centring)."""
        try:
            d, count, centered = int(state["d"]), int(state["count"]), bool(state["centered"])
            mat = state["m2"] if centered else state["sum"]
            mean = state["mean"] if centered else None
        except KeyError as exc:
            raise InputError(f"state is missing {exc.args[0]!r}") from None
        if d != self.d or centered != self.centered:
            raise InputError(f"state is (d={d}, centered={centered}), accumulator is (d={self.d}, centered={self.centered})")
        if tuple(mat.shape) != (d, d) or count < 0:
            raise InputError(f"state matrix has shape {tuple(mat.shape)} for d = {d} (count {count})")
        device = self._engine_device() if self._engine is not None else torch.device("cpu")
        self._engine_for(device).set_state(count, torch.as_tensor(mat), None if mean is None else torch.as_tensor(mean))

    def save(self, path: Any, *, metadata: dict[str, Any] | None = None) -> None:
        """Atomic safetensors file with metadata and a checksum (see :mod:`pmsolve.stats.io`)."""
        from .io import save_state

        save_state(path, self.state_dict(), metadata or {})

    @classmethod
    def load(
        cls, path: Any, *, expect: dict[str, Any] | None = None, backend: str = "auto"
    ) -> CovarianceAccumulator:
        """Read a file written by :meth:`save`; ``expect`` fields must match its metadata (else CacheError).

        A reference ``layer_stats`` ``.npz`` (recognised by its content, whatever its name) is
        read as :meth:`from_npz` does; it records no metadata, so ``expect`` cannot be checked
        against it and is refused (CacheError)."""
        return cls.load_with_metadata(path, expect=expect, backend=backend)[0]

    @classmethod
    def load_with_metadata(
        cls, path: Any, *, expect: dict[str, Any] | None = None, backend: str = "auto"
    ) -> tuple[CovarianceAccumulator, dict[str, str]]:
        """As :meth:`load`, also returning the file's metadata (model, fingerprint, module, ...);
        for a reference ``.npz``: its format, count and d."""
        from .io import is_npz, load_state

        if is_npz(path):
            if expect:
                raise CacheError(f"{path} is a reference .npz: it records no {sorted(expect)} to check; "
                                 "load it without expect= (or with CovarianceAccumulator.from_npz)")
            acc = cls.from_npz(path, backend=backend)
            return acc, {"format": "reference-npz", "count": str(acc.count), "d": str(acc.d)}
        state, meta = load_state(path, expect=expect)
        acc = cls(state["d"], dtype_products=state["dtype_products"], centered=state["centered"], backend=backend)
        acc.load_state_dict(state)
        return acc, meta

    def to_npz(self, path: Any, *, dtype: Any = None, **extra: Any) -> None:
        """Write Σxxᵀ and the count in the reference ``layer_stats`` ``.npz`` layout (float32 unless ``dtype``)."""
        import numpy as np

        from .io import write_reference_npz

        write_reference_npz(path, self.sum(), self.count, dtype=dtype or np.float32, **extra)

    @classmethod
    def from_npz(cls, path: Any, *, backend: str = "auto") -> CovarianceAccumulator:
        """An (uncentred) accumulator holding the sum and count of a reference ``.npz``."""
        from .io import read_reference_npz

        total, count = read_reference_npz(path)
        acc = cls(total.shape[0], backend=backend)
        acc.load_state_dict({"d": total.shape[0], "count": count, "centered": False, "sum": total})
        return acc

    def __repr__(self) -> str:
        return (
            f"CovarianceAccumulator(d={self.d}, count={self.count}, dtype_products={self.dtype_products!r}, "
            f"centered={self.centered}, engine={self.engine!r})"
        )
