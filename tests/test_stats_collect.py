"""collect_stats on tiny random transformers: capture, masking, resume, kill, cache, distributed (issue #3)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from pmsolve.errors import CacheError, InputError, NumericalError
from pmsolve.models.precision import fast_bf16
from pmsolve.stats import CovarianceAccumulator, collect_stats, open_corpus
from pmsolve.stats.collect import _batches, _enough
from pmsolve.stats.corpus import offline_default

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("the cat sat on a mat while seven quiet rivers ran past old stone bridges near the market "
         "where people sold bread fish and bright cloth under a pale morning sky").split()


class ByteTokenizer:
    """Bytes as token ids (BOS = 1, PAD = 0): enough for structural tests with random models."""

    pad_token_id = 0

    def __call__(self, text, truncation=True, max_length=None):
        ids = [1] + [2 + b % 250 for b in text.encode()]
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def write_corpus(path: Path, n_docs: int = 40, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with path.open("w") as fh:
        for _ in range(n_docs):  # varied lengths, so batches carry padding
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))}) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "docs.jsonl")


def oracle(model, corpus_path, modules, seq_len=128):
    """name -> (Σkkᵀ, rows) over every document run alone (no padding at all), fp64."""
    tok, rows = ByteTokenizer(), {m: [] for m in modules}
    hooks = [model.get_submodule(m).register_forward_pre_hook(lambda mod, a, m=m: rows[m].append(a[0][0].double()))
             for m in modules]
    with torch.no_grad():
        for text in open_corpus(corpus_path).texts():
            model(input_ids=torch.tensor([tok(text, max_length=seq_len)["input_ids"]]))
    for h in hooks:
        h.remove()
    return {m: (torch.cat(r).T @ torch.cat(r), sum(len(x) for x in r)) for m, r in rows.items()}


def rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def test_matches_unpadded_oracle_and_stops_after_deepest_layer(corpus):
    model = tiny_llama()
    calls = []
    model.model.layers[2].register_forward_pre_hook(lambda m, a: calls.append(1))
    res = collect_stats(model, ByteTokenizer(), [1, 0], corpus, max_tokens=10**6, batch_tokens=600, seq_len=128,
                        dtype="fp64", progress=False)
    assert not calls  # layer 2 never ran
    assert sorted(res.stats) == [0, 1] and res.modules[1] == "model.layers.1.mlp.down_proj"
    truth = oracle(model, corpus, [res.modules[0], res.modules[1]])
    for layer in (0, 1):
        total, n = truth[res.modules[layer]]
        assert res.stats[layer].count == n == res.tokens
        assert rel(res.stats[layer].sum(), total) < 1e-5  # padding masked: only batching noise remains


def _doc_lengths(n: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)  # mostly short documents, some truncated at the maximum, a few empty
    return [[len_] * len_ for len_ in (rng.choice([0, 1, 64, 64, rng.randint(1, 63)]) for _ in range(n))]


@pytest.mark.parametrize("pool_tokens", [1, 100, 700, 10**6])
def test_batches_sort_pools_by_length_and_consume_on_pool_boundaries(pool_tokens):
    docs = _doc_lengths(300, seed=pool_tokens)
    out = list(_batches(iter(docs), 256, pool_tokens))
    batched = [ids for batch, _ in out for ids in batch]
    assert sorted(map(tuple, batched)) == sorted(tuple(d) for d in docs if d)  # each document once
    assert sum(c for _, c in out) == len(docs)  # empty ones consumed too
    assert all(len(b) == 1 or len(b) * max(map(len, b)) <= 256 for b, _ in out)
    # Between boundaries: a pool, the shortest run of texts from the resume position with
    # >= pool_tokens tokens (or the corpus's rest), its documents longest first.
    ends = [i for i, (_, c) in enumerate(out) if c]
    assert ends[-1] == len(out) - 1
    position, first = 0, 0
    for end in ends:
        pool = [ids for batch, _ in out[first : end + 1] for ids in batch]
        texts = docs[position : position + out[end][1]]
        assert sorted(map(tuple, pool)) == sorted(tuple(d) for d in texts if d)
        assert [len(d) for d in pool] == sorted((len(d) for d in pool), reverse=True)
        assert sum(map(len, texts[:-1])) < pool_tokens
        assert sum(map(len, texts)) >= pool_tokens or end == len(out) - 1
        position, first = position + len(texts), end + 1
    # Resuming at any boundary (skipping the texts consumed so far) forms the same batches.
    position = 0
    for i in ends[:-1]:
        position += out[i][1]
        assert list(_batches(iter(docs[position:]), 256, pool_tokens)) == out[i + 1 :]


def test_batches_pad_less_than_corpus_order():
    docs = _doc_lengths(2000, seed=1)
    real = sum(map(len, docs))
    in_order, batch = 0, []  # consecutive documents, as many as fit (the batching before pools)
    for ids in filter(None, docs):
        if batch and (len(batch) + 1) * max(map(len, batch + [ids])) > 256:
            in_order += len(batch) * max(map(len, batch))
            batch = []
        batch.append(ids)
    in_order += len(batch) * max(map(len, batch))
    pooled = sum(len(b) * max(map(len, b)) for b, _ in _batches(iter(docs), 256, 16 * 256))
    assert pooled < 1.1 * real and in_order > 1.5 * real  # measured: 1.06 and 1.58


def test_last_batch_keeps_only_the_documents_it_needs():
    batch = [[7] * 50, [7] * 30, [7] * 30, [7] * 10]
    assert _enough(batch, 1) == batch[:1] and _enough(batch, 50) == batch[:1]
    assert _enough(batch, 51) == batch[:2] and _enough(batch, 110) == batch[:3]
    assert _enough(batch, 121) == batch == _enough(batch, 10**6)


def test_gpt2_conv1d_and_exact_token_cap(corpus):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=2, n_positions=256)).eval()
    res = collect_stats(model, ByteTokenizer(), [1], corpus, max_tokens=777, batch_tokens=512, progress=False)
    assert res.modules[1] == "transformer.h.1.mlp.c_proj"
    assert res.stats[1].d == 128 and res.stats[1].count == 777


def test_unknown_architecture_needs_template(corpus):
    model = tiny_llama()
    model.config.model_type = "mystery"
    with pytest.raises(InputError, match="module_template"):
        collect_stats(model, ByteTokenizer(), [0], corpus, max_tokens=100, progress=False)
    res = collect_stats(model, ByteTokenizer(), [0], corpus, max_tokens=100, progress=False,
                        module_template="model.layers.{}.mlp.down_proj")
    assert res.tokens == 100
    with pytest.raises(InputError, match="no module"):
        collect_stats(model, ByteTokenizer(), [7], corpus, max_tokens=100, progress=False,
                      module_template="model.layers.{}.mlp.down_proj")


def test_nan_activation_names_layer_and_batch(corpus):
    model = tiny_llama()
    seen = []

    def poison(module, args):  # the third batch overflows inside layer 1's MLP
        seen.append(1)
        if len(seen) == 3:
            return (args[0] * float("nan"),)

    model.model.layers[1].mlp.down_proj.register_forward_pre_hook(poison, prepend=True)
    with pytest.raises(NumericalError, match=r"layer 1 \(model.layers.1.mlp.down_proj\) in batch 2"):
        collect_stats(model, ByteTokenizer(), [0, 1], corpus, max_tokens=10**6, batch_tokens=300, progress=False)


def test_huge_activation_names_layer_and_batch(corpus):
    """Finite activations whose fp32 squares overflow would add Inf to C: refused, located."""
    model = tiny_llama()
    seen = []

    def blow_up(module, args):
        seen.append(1)
        if len(seen) == 2:
            return (args[0] * 1e25,)

    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(blow_up, prepend=True)
    with pytest.raises(NumericalError, match=r"too large for fp32 products at layer 0 .* in batch 1"):
        collect_stats(model, ByteTokenizer(), [0], corpus, max_tokens=10**6, batch_tokens=300, progress=False)


def test_resume_after_crash_equals_uninterrupted(tmp_path, corpus):
    model = tiny_llama()
    kw = dict(max_tokens=1500, batch_tokens=256, checkpoint_every=200, progress=False)
    whole = collect_stats(model, ByteTokenizer(), [0, 2], corpus, **kw)

    batches = []

    def crash(module, args):
        batches.append(1)
        if len(batches) == 6:
            raise KeyboardInterrupt  # like Ctrl-C mid-run

    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        collect_stats(model, ByteTokenizer(), [0, 2], corpus, cache_dir=tmp_path / "c", **kw)
    h.remove()
    assert list((tmp_path / "c").rglob("checkpoint*.safetensors"))
    resumed = collect_stats(model, ByteTokenizer(), [0, 2], corpus, cache_dir=tmp_path / "c", **kw)
    for layer in (0, 2):
        assert resumed.stats[layer].count == whole.stats[layer].count == 1500
        assert rel(resumed.stats[layer].sum(), whole.stats[layer].sum()) < 1e-12
    assert not list((tmp_path / "c").rglob("checkpoint*"))  # cleaned up once the cache is written


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from test_stats_collect import ByteTokenizer, tiny_llama
    from pmsolve.stats import collect_stats
    model = tiny_llama()
    if sys.argv[2] == "slow":  # give the parent time to kill us mid-run
        model.model.layers[0].register_forward_pre_hook(lambda m, a: time.sleep(0.1))
    res = collect_stats(model, ByteTokenizer(), [0, 1], {corpus!r}, max_tokens=1200, batch_tokens=256,
                        checkpoint_every=150, cache_dir=sys.argv[1], progress=False)
    torch.save({{l: a.sum() for l, a in res.stats.items()}}, sys.argv[1] + "/sums.pt")
""")


def _script(tmp_path, corpus):
    path = tmp_path / "run_stats.py"
    path.write_text(KILL_SCRIPT.format(tests=str(ROOT / "tests"), corpus=str(corpus)))
    return path


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, corpus):
    script = _script(tmp_path, corpus)
    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "slow"], env=_env())
    deadline = time.time() + 60
    while not list(killed.rglob("checkpoint*.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed"
    time.sleep(0.25)  # let it get past the checkpoint into the next batches
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, str(script), str(killed), "fast"], env=_env(), check=True, timeout=120)
    resumed = torch.load(killed / "sums.pt")
    whole = collect_stats(tiny_llama(), ByteTokenizer(), [0, 1], corpus, max_tokens=1200, batch_tokens=256,
                          checkpoint_every=150, progress=False)
    for layer in (0, 1):
        assert whole.stats[layer].count == 1200
        assert rel(resumed[layer], whole.stats[layer].sum()) < 1e-12


def test_cache_is_verified(tmp_path, corpus):
    model = tiny_llama()
    kw = dict(max_tokens=400, batch_tokens=256, cache_dir=tmp_path, progress=False)
    first = collect_stats(model, ByteTokenizer(), [0, 1], corpus, **kw)
    again = collect_stats(model, ByteTokenizer(), [0, 1], corpus, **kw)
    assert again.from_cache and torch.equal(again.stats[1].sum(), first.stats[1].sum())

    other = tiny_llama(seed=1)  # same architecture and id, other weights (or another dtype): own files
    theirs = collect_stats(other, ByteTokenizer(), [0], corpus, **kw)
    assert not theirs.from_cache and theirs.paths[0] != first.paths[0]
    theirs.paths[0].write_bytes(first.paths[0].read_bytes())  # a file that is not what its name says
    with pytest.raises(CacheError, match="weights_fingerprint"):
        collect_stats(other, ByteTokenizer(), [0], corpus, **kw)
    p0, p1 = first.paths[0], first.paths[1]
    p1.write_bytes(p0.read_bytes())  # layer 0's statistics under layer 1's name
    with pytest.raises(CacheError, match="layer is '0' in the file, expected '1'"):
        collect_stats(model, ByteTokenizer(), [1], corpus, **kw)
    data = p0.read_bytes()
    p0.write_bytes(data[:-64])
    with pytest.raises(CacheError):
        collect_stats(model, ByteTokenizer(), [0], corpus, **kw)


def test_autocast_forward_matches_its_oracle_and_keeps_its_own_cache(tmp_path, corpus):
    """autocast="bf16" runs the forward under torch.autocast: C matches an oracle that runs every
    document alone under autocast (batched and lone matmuls round a few keys differently, each
    by one bf16 ulp in either direction, so ‖ΔC‖/‖C‖ stays well under one ulp, 2⁻⁸: we require
    2⁻¹¹, measured ~3e-5), while the model-precision forward differs by more than that (~4e-3
    measured, so the check tells the two apart); it is cached under its own name and identity,
    never mixed with the model-precision statistics."""
    model = tiny_llama()
    kw = dict(max_tokens=10**6, batch_tokens=600, seq_len=128, dtype="fp64", progress=False, cache_dir=tmp_path)
    res = collect_stats(model, ByteTokenizer(), [0, 1], corpus, autocast="bf16", **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        truth = oracle(model, corpus, [res.modules[0], res.modules[1]])
    plain = collect_stats(model, ByteTokenizer(), [0, 1], corpus, **kw)
    for layer in (0, 1):
        total, n = truth[res.modules[layer]]
        assert res.stats[layer].count == n
        assert rel(res.stats[layer].sum(), total) <= 2**-11
        assert rel(plain.stats[layer].sum(), res.stats[layer].sum()) > 2**-11  # the forward did change
        assert res.paths[layer] != plain.paths[layer] and "bf16-forward" in res.paths[layer].name
        _, meta = CovarianceAccumulator.load_with_metadata(res.paths[layer])
        assert meta["autocast"] == "bf16" and meta["activation_dtype"] == "bfloat16"
    again = collect_stats(model, ByteTokenizer(), [0, 1], corpus, autocast="bf16", **kw)
    assert again.from_cache and torch.equal(again.stats[1].sum(), res.stats[1].sum())
    plain.paths[0].write_bytes(res.paths[0].read_bytes())  # bf16-forward statistics under the plain name
    with pytest.raises(CacheError, match="autocast"):
        collect_stats(model, ByteTokenizer(), [0], corpus, **kw)
    with pytest.raises(InputError, match="autocast"):
        collect_stats(model, ByteTokenizer(), [0], corpus, autocast="fp8", **kw)
    auto = collect_stats(model, ByteTokenizer(), [1], corpus, autocast="auto", **kw)  # bf16 where it is fast
    assert auto.from_cache and auto.paths[1] == (res if fast_bf16(torch.device("cpu")) else plain).paths[1]


def test_convergence_report_and_early_stop(corpus):
    model = tiny_llama()
    res = collect_stats(model, ByteTokenizer(), [0], corpus, max_tokens=10**6, batch_tokens=256,
                        checkpoint_every=300, report_condition=True, progress=False)
    changes = [c["rel_change"][0] for c in res.convergence]
    assert len(changes) >= 3 and changes[-1] < changes[0]
    C = res.stats[0].mean()
    assert all(1 < c["cond"][0] < float("inf") for c in res.convergence)
    # The last checkpoint's C is close to the final one; the estimate is within the usual factor of the truth.
    true_cond = float(torch.linalg.cond(C, 1))
    assert true_cond / 10 < res.convergence[-1]["cond"][0] < true_cond * 10
    stop = collect_stats(model, ByteTokenizer(), [0], corpus, max_tokens=10**6, batch_tokens=256,
                         checkpoint_every=300, stop_tol=changes[1] * 1.01, progress=False)
    assert stop.stopped_early and stop.tokens < res.tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, corpus, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = collect_stats(tiny_llama(), ByteTokenizer(), [0, 1], corpus, max_tokens=10**6, batch_tokens=256,
                            dtype="fp64", cache_dir=out, progress=False)
        torch.save({l: (a.count, a.sum()) for l, a in res.stats.items()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_gloo_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    corpus = write_corpus(tmp_path / "small.jsonl", n_docs=15)
    out = tmp_path / "dist"
    out.mkdir()
    mp.spawn(_dist_worker, args=(2, _free_port(), str(corpus), str(out)), nprocs=2, join=True)
    single = collect_stats(tiny_llama(), ByteTokenizer(), [0, 1], corpus, max_tokens=10**6, batch_tokens=256,
                           dtype="fp64", progress=False)
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for layer in (0, 1):
        assert r0[layer][0] == r1[layer][0] == single.stats[layer].count
        assert torch.equal(r0[layer][1], r1[layer][1])  # every rank holds the same reduced result
        assert rel(r0[layer][1], single.stats[layer].sum()) < 1e-5  # only batch-composition noise
    cached = list(out.rglob("*.safetensors"))
    assert len(cached) == 2 and not any("checkpoint" in p.name for p in cached)
    meta_ok = CovarianceAccumulator.load(cached[0], expect={"world_size": 2})
    assert meta_ok.count == single.stats[0].count


def test_cli_stats_under_torchrun_equals_one_process(tmp_path, corpus):
    """`torchrun --nproc-per-node 2 -m pmsolve.cli stats ...`: the two processes split the corpus
    (gloo on loopback), rank 0 writes files holding the same statistics as one process."""
    folder = tiny_folder(tmp_path)
    common = ["stats", "--model", str(folder), "--layers", "0-1", "--corpus", str(corpus), "--max-tokens",
              "100000", "--batch-tokens", "64", "--dtype", "fp64", "--autocast", "none", "--quiet"]
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "pmsolve.cli"]
    two = subprocess.run(launch + common + ["--out", str(tmp_path / "two")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    report = json.loads(two.stdout)  # rank 0 alone prints
    assert report["processes"] == 2
    one = subprocess.run([sys.executable, "-m", "pmsolve.cli"] + common + ["--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(one.stdout)["processes"] == 1
    for layer in ("0", "1"):
        a = CovarianceAccumulator.load(report["files"][layer], expect={"world_size": 2})
        b = CovarianceAccumulator.load(json.loads(one.stdout)["files"][layer])
        assert a.count == b.count == report["tokens"] > 0
        # Same tokens, other batches: the fp32 forward pass rounds differently per batch
        # composition (~1e-8 relative measured); a lost or doubled token would be ~1e-3.
        assert rel(a.sum(), b.sum()) < 1e-6


def test_corpora(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first paragraph\nstill first\n\n\nsecond one\n")
    c = open_corpus(txt)
    assert list(c.texts()) == ["first paragraph\nstill first", "second one"] and c.id.startswith("text:a.txt:")
    txt.write_text("changed\n")
    assert open_corpus(txt).id != c.id
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(InputError, match="b.jsonl:2"):
        list(open_corpus(bad).texts())
    with pytest.raises(InputError, match="neither a file"):
        open_corpus(tmp_path / "missing.txt")
    off = offline_default()
    first = [t for _, t in zip(range(50), off.texts())]
    assert first == [t for _, t in zip(range(50), open_corpus(None).texts())]  # deterministic
    assert off.id.startswith("offline-pydocs/2:py") and sum(len(t) for t in first) > 20_000


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["one doc", None, "another doc", ""], "body": ["b0", "b1", "b2", "b3"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    corpus = open_corpus(tmp_path / "ds")
    assert list(corpus.texts()) == ["one doc", "another doc"]  # missing and empty documents skipped
    body = open_corpus(tmp_path / "ds", field="body")
    assert list(body.texts()) == rows["body"] and body.id != corpus.id  # the field is part of the cache id
    # A DatasetDict: its "train" split.
    splits = {"test": datasets.Dataset.from_dict({"text": ["t"]}), "train": datasets.Dataset.from_dict({"text": ["a"]})}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "dd"))
    assert list(open_corpus(tmp_path / "dd").texts()) == ["a"]
    with pytest.raises(InputError, match=r"no column 'content'.*\['text', 'body'\]"):
        open_corpus(tmp_path / "ds", field="content")
    datasets.Dataset.from_dict({"n": [1, 2]}).save_to_disk(str(tmp_path / "ints"))
    with pytest.raises(InputError, match=r"row 0: field 'n' holds a value of type int, not a string"):
        list(open_corpus(tmp_path / "ints", field="n").texts())


def test_named_hf_dataset_resolves_name_config_and_split(monkeypatch):
    """hf:NAME[:CONFIG[:SPLIT]] (the download itself needs a network; load_dataset is stood in for)."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": [f"{name}/{config}/{split}"]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert list(open_corpus("hf:wiki").texts()) == ["wiki/None/train"]
    assert list(open_corpus("hf:wiki:en:validation").texts()) == ["wiki/en/validation"]
    assert calls == [("wiki", None, "train"), ("wiki", "en", "validation")]
    assert open_corpus("hf:wiki:en:validation").id.startswith("hf:wiki:en:validation:text:")
    with pytest.raises(InputError, match="name the dataset"):
        open_corpus("hf:")


def test_jsonl_values_must_be_strings(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "a"}\n{"text": null}\n{"text": 3}\n')
    with pytest.raises(InputError, match=r"c.jsonl:3: field 'text' holds a value of type int"):
        list(open_corpus(f).texts())


def tiny_folder(tmp_path) -> Path:
    """tiny_llama with a word-level tokenizer over WORDS, saved as a model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(WORDS)))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "tiny"
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(folder)
    tiny_llama().save_pretrained(folder)
    return folder


def test_cli_stats_writes_cache_and_npz(tmp_path, corpus, capsys):
    from pmsolve.cli import main

    folder = tiny_folder(tmp_path)
    out = tmp_path / "stats"
    # A layer the model lacks: one line naming it, exit status 2, no traceback, nothing written.
    rc = main(["stats", "--model", str(folder), "--layers", "0,9", "--corpus", str(corpus), "--max-tokens", "300",
               "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "pmsolve stats: error: layer 9" in err and "Traceback" not in err
    rc = main(["stats", "--model", str(folder), "--layers", "0-1", "--corpus", str(corpus), "--max-tokens", "300",
               "--out", str(out), "--npz", "--quiet"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == 300 and set(report["files"]) == {"0", "1"}
    for path in report["files"].values():
        acc = CovarianceAccumulator.load(path, expect={"model_id": "tiny", "max_tokens": 300})
        back = CovarianceAccumulator.from_npz(Path(path).with_suffix(".npz"))
        assert back.count == acc.count == 300 and rel(back.sum(), acc.sum()) < 1e-6


def test_cli_stats_corpus_field(tmp_path, corpus, capsys):
    """--corpus-field reads another JSON key; the default field missing is one error line, exit 2."""
    from pmsolve.cli import main

    folder = tiny_folder(tmp_path)
    body = tmp_path / "body.jsonl"
    body.write_text("".join(json.dumps({"body": json.loads(line)["text"]}) + "\n" for line in corpus.open()))
    common = ["stats", "--model", str(folder), "--layers", "0", "--max-tokens", "200", "--quiet", "--no-resume"]
    assert main(common + ["--corpus", str(corpus), "--out", str(tmp_path / "a")]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(common + ["--corpus", str(body), "--corpus-field", "body", "--out", str(tmp_path / "b")]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tokens"] == want["tokens"] == 200
    a, b = (CovarianceAccumulator.load(r["files"]["0"]) for r in (want, got))
    assert torch.equal(a.sum(), b.sum())  # the same documents, in the same order
    assert main(common + ["--corpus", str(body), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "body.jsonl:1" in err and "'text'" in err and "Traceback" not in err


def test_load_stats_finds_ours_and_the_references_files_by_module(tmp_path, corpus):
    from pmsolve.stats import load_stats

    model = tiny_llama()
    res = collect_stats(model, ByteTokenizer(), [0, 2], corpus, max_tokens=500, batch_tokens=256,
                        cache_dir=tmp_path / "ours", progress=False)
    got = load_stats(tmp_path / "ours", model, [2, 0])  # searched recursively
    assert got.from_cache and got.tokens == 500 and got.paths == res.paths
    for layer in (0, 2):
        assert torch.equal(got.stats[layer].sum(), res.stats[layer].sum())
    ref = tmp_path / "reference" / "wikipedia_stats"  # the reference's names: {module}_{dtype}_mom2_{n}.npz
    for layer in (0, 2):
        res.stats[layer].to_npz(ref / f"{res.modules[layer]}_float32_mom2_500.npz")
    from_npz = load_stats(tmp_path / "reference", model, [0, 2])
    for layer in (0, 2):
        # float32 in the file, as the reference stores it: one rounding
        assert rel(from_npz.stats[layer].sum(), res.stats[layer].sum()) < 1e-7
        assert from_npz.stats[layer].count == 500
    single = load_stats(ref / f"{res.modules[2]}_float32_mom2_500.npz", model, 2)  # one file, one layer
    assert single.stats[2].count == 500


def test_load_stats_refuses_what_does_not_fit(tmp_path, corpus):
    from pmsolve.stats import load_stats

    model = tiny_llama()
    res = collect_stats(model, ByteTokenizer(), [0, 1], corpus, max_tokens=300, batch_tokens=256,
                        cache_dir=tmp_path / "ours", progress=False)
    with pytest.raises(InputError, match=r"layer 2 .*found none"):
        load_stats(tmp_path / "ours", model, [0, 2])
    with pytest.raises(InputError, match="does not exist"):
        load_stats(tmp_path / "nowhere", model, [0])
    with pytest.raises(InputError, match="no module"):
        load_stats(tmp_path / "ours", model, [9])
    # Two candidates for one module: ambiguous, both named.
    second = tmp_path / "ours" / "copy" / res.paths[0].name
    second.parent.mkdir()
    second.write_bytes(res.paths[0].read_bytes())
    with pytest.raises(InputError, match="several files .*copy.*glob pattern"):
        load_stats(tmp_path / "ours", model, [0])
    # Statistics of two token counts side by side, as `pmsolve stats` leaves them: a pattern picks.
    more = collect_stats(model, ByteTokenizer(), [0, 1], corpus, max_tokens=400, batch_tokens=256,
                         cache_dir=tmp_path / "two", progress=False)
    collect_stats(model, ByteTokenizer(), [0, 1], corpus, max_tokens=300, batch_tokens=256,
                  cache_dir=tmp_path / "two", progress=False)
    with pytest.raises(InputError, match="several files"):
        load_stats(tmp_path / "two", model, [0, 1])
    picked = load_stats(str(tmp_path / "two" / "**" / "*.400tok*"), model, [0, 1])
    assert picked.tokens == 400 and picked.paths == more.paths
    # Layer 0's file under layer 1's name: its metadata says otherwise.
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / res.paths[1].name).write_bytes(res.paths[0].read_bytes())
    with pytest.raises(CacheError, match="not of 'model.layers.1.mlp.down_proj'"):
        load_stats(swapped, model, [1])
    # Another width: the reference file of some other model.
    other = tmp_path / "other"
    acc = CovarianceAccumulator(32)
    acc.update(torch.randn(10, 32))
    acc.to_npz(other / f"{res.modules[0]}_float32_mom2_10.npz")
    with pytest.raises(CacheError, match="32-dimensional"):
        load_stats(other, model, [0])
    # Statistics of other weights of the same architecture: usable, with a warning.
    with pytest.warns(UserWarning, match="other weights"):
        load_stats(tmp_path / "ours", tiny_llama(seed=1), [1])


def test_merge_stats_adds_shards_exactly_and_refuses_what_does_not_add_up(tmp_path, capsys):
    """Two corpus halves collected apart, merged by `pmsolve merge-stats`: the sum of the parts,
    found by load_stats; the same part twice, or parts of other weights, are refused."""
    from pmsolve.cli import main
    from pmsolve.stats import load_stats, merge_stats

    model = tiny_llama()
    parts = []
    for i in (0, 1):
        corpus = write_corpus(tmp_path / f"half{i}.jsonl", n_docs=20, seed=i)
        parts.append(collect_stats(model, ByteTokenizer(), [0, 1], corpus, max_tokens=10**6, batch_tokens=256,
                                   cache_dir=tmp_path / f"part{i}", progress=False))
    assert main(["merge-stats", str(tmp_path / "part0"), str(tmp_path / "part1"), "--out", str(tmp_path / "all")]) == 0
    written = json.loads(capsys.readouterr().out)
    assert set(written) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    merged = load_stats(tmp_path / "all", model, [0, 1])
    for layer in (0, 1):
        a, b = parts[0].stats[layer], parts[1].stats[layer]
        assert merged.stats[layer].count == a.count + b.count
        assert torch.equal(merged.stats[layer].sum(), a.sum() + b.sum())  # fp64 sums add exactly here
    with pytest.raises(InputError, match="same rows"):
        merge_stats([tmp_path / "part0", tmp_path / "part0" / ".."/ "part0"], tmp_path / "twice")
    other = collect_stats(tiny_llama(seed=1), ByteTokenizer(), [0], tmp_path / "half1.jsonl", max_tokens=10**6,
                          batch_tokens=256, cache_dir=tmp_path / "other", progress=False)
    assert other.tokens > 0
    with pytest.raises(InputError, match="weights_fingerprint"):
        merge_stats([parts[0].paths[0], other.paths[0]], tmp_path / "mixed")
    with pytest.raises(InputError, match="nothing to merge"):
        merge_stats([parts[0].paths[0]], tmp_path / "one")
    assert main(["merge-stats", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
