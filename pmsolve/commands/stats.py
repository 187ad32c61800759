"""`pmsolve stats`: collect preservation statistics for some layers of a model.

    pmsolve stats --model PATH_OR_ID --layers 4,5,6 --corpus wiki.jsonl --max-tokens 2000000 --out stats/

Data parallel when started by torchrun: each process takes a shard of the corpus, the sums
are added in fp64 across processes, rank 0 writes the files and prints the report.

    torchrun --nproc-per-node 8 -m pmsolve.cli stats --device-map cuda --layers 4-8 --out stats/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._args import parse_layers, positive_int
from .edit import add_document_start, document_start


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="collect covariance statistics C = E[k kᵀ] of rewrite-module inputs")
    p.add_argument("--model", default=None, help="model folder or Hub id (default: the built-in SmolLM2-135M)")
    add_document_start(p)
    p.add_argument("--layers", required=True, type=parse_layers, help="layer indices, e.g. 4,5,6 or 4-6")
    p.add_argument("--corpus", default=None, help="text/JSONL file, saved HF dataset, 'hf:<name>' or 'offline' (default)")
    p.add_argument("--corpus-field", default="text", help="the JSON key or dataset column holding the text (default: text)")
    p.add_argument("--max-tokens", type=positive_int, default=100_000, help="real tokens per layer")
    p.add_argument("--batch-tokens", type=positive_int, default=4096, help="padded tokens per forward batch")
    p.add_argument("--seq-len", type=positive_int, default=512, help="truncate documents to this many tokens")
    p.add_argument("--dtype", choices=("fp32", "fp64"), default="fp32", help="product precision (master sum is fp64)")
    p.add_argument("--autocast", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="run the forward under torch.autocast in this dtype; auto (default, as `pmsolve edit` does): "
                        "bf16 where bf16 is fast (CPUs with AMX or AVX512-BF16, CUDA); none: the model's own precision")
    p.add_argument("--centered", action="store_true", help="also collect the mean and centred covariance")
    p.add_argument("--module-template", default=None, help="rewrite module name with {} for the layer")
    p.add_argument("--checkpoint-every", type=positive_int, default=200_000, help="tokens between checkpoints")
    p.add_argument("--stop-tol", type=float, default=None, help="stop once C changes less than this per checkpoint")
    p.add_argument("--report-condition", action="store_true", help="condition estimate of C at each checkpoint")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--npz", action="store_true", help="also write reference-layout .npz files (mom2.mom2/mom2.count)")
    p.add_argument("--device-map", default=None,
                   help="where the model runs, e.g. cuda (under torchrun: each process's own GPU)")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _join_torchrun(device_map: str | None) -> tuple[bool, int, str | None]:
    """Under torchrun (WORLD_SIZE > 1), join its process group: gloo for a model on the CPU,
    NCCL for one on CUDA, where "cuda" means this process's GPU (LOCAL_RANK). Returns
    (joined here, rank, device map)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False, dist.get_rank() if dist.is_initialized() else 0, device_map
    on_cuda = device_map is not None and device_map.startswith("cuda")
    if on_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device_map = device_map if ":" in device_map else f"cuda:{local}"
        torch.cuda.set_device(torch.device(device_map))
    dist.init_process_group("nccl" if on_cuda else "gloo")
    return True, dist.get_rank(), device_map


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    joined, rank, device_map = _join_torchrun(args.device_map)
    try:
        return _run(args, rank, device_map)
    finally:
        if joined:
            dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, device_map: str | None) -> int:
    import torch.distributed as dist

    from pmsolve.models.loading import load_model
    from pmsolve.stats import collect_stats

    loaded = load_model(args.model, document_start=document_start(args), device_map=device_map)
    try:
        res = _collect(args, loaded, collect_stats, rank)
    except KeyboardInterrupt:
        if rank == 0:
            saved = sorted(Path(args.out).rglob("checkpoint.*.safetensors"))
            print("\npmsolve stats: " + (f"progress is checkpointed in {saved[-1]}; the same command resumes from it"
                                          if saved else "interrupted before the first checkpoint: nothing saved"),
                  file=sys.stderr)
        raise
    if rank != 0:  # every rank holds the summed statistics; rank 0 wrote them
        return 0
    if args.npz:
        for layer, acc in res.stats.items():
            acc.to_npz(res.paths[layer].with_suffix(".npz"))
    print(json.dumps({
        "tokens": res.tokens,
        "processes": dist.get_world_size() if dist.is_initialized() else 1,
        "from_cache": res.from_cache,
        "stopped_early": res.stopped_early,
        "seconds": round(res.seconds, 2),
        "seconds_forward": round(res.seconds_forward, 2),
        "seconds_accumulate": round(res.seconds_accumulate, 2),
        "files": {layer: str(p) for layer, p in res.paths.items()},
        "convergence": res.convergence,
    }, indent=2))
    return 0


def _collect(args: argparse.Namespace, loaded, collect_stats, rank: int):
    from pmsolve.stats import open_corpus

    return collect_stats(
        loaded.model,
        loaded.tokenizer,
        args.layers,
        open_corpus(args.corpus, field=args.corpus_field),
        max_tokens=args.max_tokens,
        batch_tokens=args.batch_tokens,
        seq_len=args.seq_len,
        dtype=args.dtype,
        autocast=None if args.autocast == "none" else args.autocast,
        cache_dir=args.out,
        resume=not args.no_resume,
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet and rank == 0,
        module_template=args.module_template,
        model_id=loaded.model_id,
        centered=args.centered,
        stop_tol=args.stop_tol,
        report_condition=args.report_condition,
    )
