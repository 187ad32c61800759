"""Experiments behind docs/RESULTS.md (`pmsolve experiments`).

See :mod:`.runner` for what each experiment does and :mod:`.precompute` for why keys and
values are computed once per fact and shared by every single-layer solve.
"""
