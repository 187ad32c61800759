"""The editing pipeline with the model on a CUDA device: statistics, keys, v*, solve, apply;
the statistics accumulator's accuracy on bf16/fp16 rows there.

Everything else tests these stages on CPU tensors; here the same model is edited on
the GPU and on the CPU and the two are compared. Skips where torch sees no CUDA device.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import pmsolve
from editing_fixtures import ARCHS, CORPUS, REQUESTS, model, same_weights, snapshot, stats, tokenizer
from pmsolve.editing import ValueConfig, load_requests
from pmsolve.editing.keys import context_templates
from pmsolve.editing.steps import measure_keys
from pmsolve.models.adapters import adapter_for
from pmsolve.stats import CovarianceAccumulator, collect_stats

FAST = ValueConfig(steps=4)  # autocast "auto": bf16 on a GPU with fast bf16
FAST_FP32 = ValueConfig(steps=4, autocast=None)  # the same arithmetic on both devices


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def expected_backend() -> str:
    return "cuda" if "cuda" in pmsolve.available_backends() else "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_edit_on_cuda_matches_cpu(arch, tok, gpu_only):
    cpu_model = model(arch, len(tok))
    C = stats(cpu_model, tok)
    gpu_model = copy.deepcopy(cpu_model).to(gpu_only)
    snap = snapshot(gpu_model)
    kw = dict(method="emmet", layers=[1, 2], value_config=FAST_FP32, seed=0, preset=None)

    res_cpu = pmsolve.edit(cpu_model, tok, REQUESTS, stats=C, **kw)
    res_gpu = pmsolve.edit(gpu_model, tok, REQUESTS, stats={k: v.to(gpu_only) for k, v in C.items()}, **kw)

    assert all(p.device == gpu_only for p in gpu_model.parameters())
    assert {e.update.diagnostics.backend for e in res_gpu.edits} == {expected_backend()}
    for e_cpu, e_gpu in zip(res_cpu.edits, res_gpu.edits, strict=True):
        assert e_gpu.module == e_cpu.module
        assert e_gpu.update.diagnostics.residual < 1e-9
        # The two runs differ only in fp32 rounding of the forward/backward passes (~1e-6
        # relative) before 4 Adam steps, whose sign-like first steps can amplify it in
        # near-zero gradient components; a wrong computation differs at O(1).
        d = rel(e_gpu.update.dense().cpu(), e_cpu.update.dense())
        print(f"{arch} {e_gpu.module}: rel diff of the update GPU vs CPU {d:.1e}")
        assert d < 5e-2, d
    json.dumps(res_gpu.report())
    res_gpu.restore()
    assert same_weights(gpu_model, snap)


@pytest.mark.gpu
def test_equality_edit_on_cuda_maps_keys_to_values(tok, gpu_only):
    """As tests/test_editing.py's check, on the GPU (v* under the default autocast): the
    rewrite module sends k* to W0 k* + R."""
    cpu_model = model("llama", len(tok))
    C = {k: v.to(gpu_only) for k, v in stats(cpu_model, tok).items()}
    m = cpu_model.to(gpu_only)
    ad = adapter_for(m)
    K = measure_keys(m, ad, tok, load_requests(REQUESTS), context_templates(m, tok), [2]).average[2]
    assert K.device == gpu_only
    with torch.no_grad():
        before = ad.rewrite(2)(K).double()
    res = pmsolve.edit(m, tok, REQUESTS, stats=C, method="emmet", layers=[2], value_config=FAST, preset=None)
    (e,) = res.edits
    with torch.no_grad():
        after = ad.rewrite(2)(K).double()
    R = e.update.U.T.to(after.device)
    assert rel(after - before, R) < 1e-4  # fp32 weights: about 1e-6 expected


@pytest.mark.gpu
def test_collect_stats_on_cuda_matches_cpu(tok, gpu_only, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([CORPUS] * 6))
    cpu_model = model("gpt2", len(tok))
    gpu_model = copy.deepcopy(cpu_model).to(gpu_only)
    kw = dict(max_tokens=10_000, batch_tokens=256, seq_len=64, progress=False)
    on_cpu = collect_stats(cpu_model, tok, [1, 3], str(corpus), **kw)
    on_gpu = collect_stats(gpu_model, tok, [1, 3], str(corpus), **kw)
    assert on_gpu.tokens == on_cpu.tokens > 0
    for layer in (1, 3):
        C_gpu, C_cpu = on_gpu.stats[layer].mean(), on_cpu.stats[layer].mean()
        assert C_gpu.device == gpu_only
        # Same tokens; fp32 activations differ between devices by ~1e-6 relative.
        assert rel(C_gpu.cpu(), C_cpu) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows_on_cuda_are_as_accurate_as_fp32(dtype, gpu_only):
    """bf16/fp16 rows on a GPU keep the fp32 product's accuracy (flash-attention's rule: the
    error against fp64 within a small multiple of the fp32 path's on the same rows). A
    tensor-core product of the rows as they are, with an fp32 result, failed this on an
    H200 (7e-6 vs 5e-8), which is why the accumulator upcasts them first."""
    g = torch.Generator(device="cpu").manual_seed(0)
    d, rows = 512, 40_000
    scale, mean = torch.rand(d, generator=g) * 2 + 0.1, torch.randn(d, generator=g)
    x = (torch.randn(rows, d, generator=g) * scale + mean).to(dtype).to(gpu_only)
    truth = x.double().mT @ x.double()
    fast, ref = CovarianceAccumulator(d), CovarianceAccumulator(d)
    fast.update(x)
    ref.update(x.float())
    assert fast.count == ref.count == rows
    e_fast, e_ref = rel(fast.sum(), truth), rel(ref.sum(), truth)
    print(f"{dtype}: rel err vs fp64 {e_fast:.1e} (fp32 path {e_ref:.1e})")
    assert e_fast <= 4 * e_ref and e_fast < 1e-6


def _edit_cli(folder, reqs, out, *extra: str) -> dict:
    from pmsolve import cli

    argv = ["edit", "--model", str(folder), "--requests", str(reqs), "--layers", "1-2", "--method", "emmet",
            "--stats-tokens", "3000", "--preset", "llama", "--values", '{"steps": 4, "autocast": null}',
            "--no-save-model", "--out", str(out), *extra]
    assert cli.main(argv) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.gpu
def test_edit_and_apply_commands_on_cuda(tok, gpu_only, tmp_path, monkeypatch):
    """`pmsolve edit --device-map cuda` (statistics, keys, v*, solve, apply on the GPU) makes
    the updates the CPU run makes, and `pmsolve apply` puts them into a model loaded on the CPU
    (the weight hashes do not depend on the device)."""
    pytest.importorskip("accelerate")  # transformers' device_map needs it
    from pmsolve import cli
    from pmsolve.editing import load_updates

    monkeypatch.setenv("PMSOLVE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiny"
    model("llama", len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("\n".join(json.dumps(r) for r in REQUESTS))
    on_gpu = _edit_cli(folder, reqs, tmp_path / "gpu", "--device-map", str(gpu_only))
    on_cpu = _edit_cli(folder, reqs, tmp_path / "cpu")
    assert on_gpu["layers"] == on_cpu["layers"] == [1, 2]
    assert {e["solve_backend"] for e in on_gpu["edits"]} == {expected_backend()}
    assert max(e["residual_rounded"] for e in on_gpu["edits"]) < 1e-5  # fp32 weights
    (gpu_upd, _), (cpu_upd, _) = load_updates(tmp_path / "gpu" / "updates.safetensors"), \
        load_updates(tmp_path / "cpu" / "updates.safetensors")
    for g, c in zip(gpu_upd, cpu_upd, strict=True):
        assert g["module"] == c["module"]
        # As in test_edit_on_cuda_matches_cpu: fp32 rounding amplified by a few Adam steps.
        assert rel(g["U"] @ g["B"].mT, c["U"] @ c["B"].mT) < 5e-2
    applied = tmp_path / "applied"
    assert cli.main(["apply", "--updates", str(tmp_path / "gpu" / "updates.safetensors"), "--model", str(folder),
                     "--out", str(applied)]) == 0
    # `pmsolve stats --device-map cuda` (one process) against the CPU's statistics.
    from pmsolve.stats import CovarianceAccumulator

    files = {}
    for where, extra in (("gpu", ["--device-map", str(gpu_only)]), ("cpu", [])):
        assert cli.main(["stats", "--model", str(folder), "--layers", "1", "--max-tokens", "3000",
                         "--out", str(tmp_path / f"stats-{where}"), "--quiet", *extra]) == 0
        (files[where],) = (tmp_path / f"stats-{where}").rglob("*.safetensors")
    on_gpu, on_cpu = CovarianceAccumulator.load(files["gpu"]), CovarianceAccumulator.load(files["cpu"])
    assert on_gpu.count == on_cpu.count and rel(on_gpu.sum(), on_cpu.sum()) < 1e-4  # as collect_stats above
