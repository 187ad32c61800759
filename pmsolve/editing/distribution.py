"""Edit distribution: how the residual z − h_L is shared among the edited layers.

Independent of the solver. A distribution gives one weight w_i per layer (l_1 < … < l_L).
The editor walks the layers in order; at layer i it re-measures, in the partially edited
model, the keys at l_i and the current output at l_L, and lets this layer take the share

    w_i / (w_i + … + w_L)

of what is still missing. Uniform weights give MEMIT's residual / (L − i + 1); one layer
is single-layer editing (ROME/EMMET style).

``CostBalanced`` (our design) picks the weights that minimise the total preservation cost.
Writing r_i for the part of the residual produced by layer i, the cheapest update that
maps key k_i to r_i costs ‖r_i‖² / g_i in tr(Δ C Δᵀ), with g_i = k_iᵀ C_i⁻¹ k_i (the
diagonal of G at that layer). Minimising Σ‖r_i‖²/g_i subject to Σ r_i = r gives r_i ∝ g_i:
layers where the edit keys stand out from the preserved keys (large g) take more of the
edit. The g_i are measured once per batch on the unedited model (mean over the batch's
facts); the sequential re-measurement then corrects for layer interactions as in MEMIT.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..errors import InputError


class Distribution:
    """Base class: ``weights(layers, sensitivity)`` → one positive weight per layer."""

    name = "base"
    needs_sensitivity = False

    def check(self, layers: Sequence[int]) -> list[int]:
        layers = list(layers)
        if not layers:
            raise InputError("no layers to edit")
        if len(set(layers)) != len(layers):
            raise InputError(f"layers {layers} contain duplicates")
        return sorted(layers)

    def weights(self, layers: Sequence[int], sensitivity: Callable[[int], float] | None = None) -> list[float]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SingleLayer(Distribution):
    name = "single"

    def check(self, layers: Sequence[int]) -> list[int]:
        layers = super().check(layers)
        if len(layers) != 1:
            raise InputError(f"the single-layer distribution edits exactly one layer, got {layers}")
        return layers

    def weights(self, layers, sensitivity=None):
        return [1.0]


class MemitSpread(Distribution):
    name = "memit"

    def weights(self, layers, sensitivity=None):
        return [1.0] * len(layers)


class CostBalanced(Distribution):
    name = "balanced"
    needs_sensitivity = True

    def weights(self, layers, sensitivity=None):
        if sensitivity is None:
            raise InputError("the balanced distribution needs a sensitivity measure per layer")
        g = [float(sensitivity(layer)) for layer in layers]
        if not all(x > 0 for x in g):
            raise InputError(f"layer sensitivities must be positive, got {g}")
        return g


def remaining_share(weights: Sequence[float], i: int) -> float:
    """Share of the still-missing residual that layer i takes."""
    return weights[i] / sum(weights[i:])


_BY_NAME = {cls.name: cls for cls in (SingleLayer, MemitSpread, CostBalanced)}


def get_distribution(spec: str | Distribution | None, layers: Sequence[int]) -> Distribution:
    """A distribution from a name ("single", "memit", "balanced") or instance; None picks
    single for one layer and memit for several."""
    if isinstance(spec, Distribution):
        return spec
    if spec is None:
        return SingleLayer() if len(list(layers)) == 1 else MemitSpread()
    if spec not in _BY_NAME:
        raise InputError(f"unknown distribution {spec!r}; choose one of {sorted(_BY_NAME)}")
    return _BY_NAME[spec]()
