"""`pmsolve info`: which backends load here, the BLAS in use, thread counts."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show backends, BLAS configuration and threads")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import pmsolve
    from pmsolve._native import native

    mod = native()
    info = {
        "pmsolve": pmsolve.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "backends": pmsolve.available_backends(),
        "native_unavailable_reason": pmsolve.native_unavailable_reason(),
        "blas": mod.blas_config() if mod else None,
        "cuda_available": torch.cuda.is_available(),
    }
    print(json.dumps(info, indent=2))
    return 0
