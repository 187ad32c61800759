"""An Editor on disk: a folder that a later process reopens on the same model.

    editor.json                 settings, context templates, the edited modules and their
                                unedited fingerprints, each layer's statistics fingerprint, the
                                batch log (file, request count, fingerprints after), the edit
                                call in progress; written last and atomically
    base.safetensors            the unedited weights of the edited modules (exact undo after
                                reopening, whichever state the model is in)
    batch-NNNNNN-HASH.safetensors   one batch: factored updates, keys, requests, v* records
    nullspace-L<layer>.safetensors  AlphaEdit's null space of each layer (no second eigh)

A batch file is written (atomically) before the editor.json that lists it, so a kill at any
point leaves a folder that opens with every batch the last editor.json lists; files it does
not list (a batch being written, batches undone) are removed by the next save. The hash in a
batch file's name comes from the weights after it, so a batch made after an undo never takes
the name of the one it replaced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write, read_safetensors
from ..errors import CacheError, PMSolveError
from ..lifelong import NullSpace, _factor_fingerprint
from ..solver import SolveDiagnostics, Update
from .requests import load_requests
from .steps import LayerEdit, weight_fingerprint

STATE_FILE = "editor.json"
_FORMAT = "pmsolve.editor/1"
_BATCH_FORMAT = "pmsolve.editor-batch/1"


def _batch_name(index: int, after: dict[str, str]) -> str:
    tag = hashlib.sha256(json.dumps(after, sort_keys=True).encode()).hexdigest()[:10]
    return f"batch-{index:06d}-{tag}.safetensors"


def save_state_batch(folder: Path, editor, index: int) -> None:
    """Write batch ``index`` of ``editor`` (atomically; its name is new unless it is the same batch)."""
    from .editor import encode_edits

    bt = editor.batches[index]
    path = folder / _batch_name(index, bt.after)
    if path.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    header = {"format": _BATCH_FORMAT, "batch": index, "requests": [r.as_dict() for r in bt.requests],
              "values": bt.values, "after": bt.after}
    atomic_write(path, encode_edits(bt.edits, header, full=True))


def save_state(folder: Path, editor) -> None:
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.safetensors"
    if not base.exists():
        atomic_write(base, save({name: w.detach().to("cpu").contiguous() for name, w in editor.originals.items()},
                                metadata={"format": "pmsolve.editor-base/1", "fingerprints": json.dumps(editor.base)}))
    null_files = {}
    for layer, ns in editor.null_spaces.items():
        name = f"nullspace-L{layer}.safetensors"
        if not (folder / name).exists():
            ns.save(folder / name)
        null_files[str(layer)] = name
    files = []
    for i, bt in enumerate(editor.batches):
        save_state_batch(folder, editor, i)
        files.append({"file": _batch_name(i, bt.after), "requests": len(bt.requests), "after": bt.after})
    doc = {"format": _FORMAT, "settings": editor._settings(), "context_templates": editor.context_templates,
           "modules": {str(layer): editor.adapter.rewrite_name(layer) for layer in editor.layers},
           "d_in": editor.adapter.d_in, "base": editor.base,
           "stats": {str(layer): _factor_fingerprint(f) for layer, f in editor.factors.items()},
           "null_spaces": null_files, "batches": files, "call": editor._call}
    atomic_write(folder / STATE_FILE, json.dumps(doc, indent=1).encode())
    listed = {f["file"] for f in files}
    for stale in folder.glob("batch-*.safetensors"):
        if stale.name not in listed:
            stale.unlink(missing_ok=True)


def _read_json(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise CacheError(f"{folder} holds no saved editor ({STATE_FILE} is missing)")
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"{path} is unreadable: {exc}") from None
    if doc.get("format") != _FORMAT:
        raise CacheError(f"{path} is not a pmsolve editor state (format {doc.get('format')!r})")
    return doc


def _read_batch(path: Path, device: torch.device) -> tuple[list, list[dict[str, Any]], list[LayerEdit]]:
    tensors, meta = read_safetensors(path, "editor batch")
    try:
        header = json.loads(meta["pmsolve"])
        if header.get("format") != _BATCH_FORMAT:
            raise CacheError(f"{path} is not a pmsolve editor batch")
        edits = [LayerEdit(e["batch"], e["layer"], e["module"], e["layout"], e["share"],
                           Update(tensors[f"{i}.U"].to(device), tensors[f"{i}.B"].to(device),
                                  SolveDiagnostics(**e["diagnostics"])),
                           e["residual_rounded"], tensors[f"{i}.K"].to(device) if f"{i}.K" in tensors else None)
                 for i, e in enumerate(header["edits"])]
        requests = load_requests(header["requests"])
    except CacheError:
        raise
    except (KeyError, TypeError, ValueError, PMSolveError) as exc:
        raise CacheError(f"editor batch file {path} is damaged: {exc}") from None
    return requests, header["values"], edits


def open_state(cls, folder: Path, model, tokenizer, stats: Any, *, templates=None, keep_saving: bool = True):
    from ..models.adapters import adapter_for
    from .editor import EditedBatch

    doc = _read_json(folder)
    s = doc["settings"]
    adapter = adapter_for(model, templates)
    for layer, module in doc["modules"].items():
        try:
            mine = adapter.rewrite_name(adapter.check_layer(int(layer)))
        except PMSolveError:
            mine = None
        if mine != module or adapter.d_in != doc["d_in"]:
            raise CacheError(f"{folder} was saved for another model: layer {layer} edits {module!r} "
                             f"(d_in {doc['d_in']}), this model has {mine!r} (d_in {adapter.d_in})")
    null_spaces = {int(layer): NullSpace.load(folder / name, map_location="cpu")
                   for layer, name in doc["null_spaces"].items()}
    ko = s["key_options"]
    ed = cls(model, tokenizer, s["method"], s["layers"], s["distribution"], stats, s["mu"], s["seed"],
             retention=s["retention"], null_space=s["null_space"], preset=None, value_config=s["value_config"],
             templates=templates, model_id=s["model_id"], start_key=ko["start_key"], key_source=ko["source"],
             preserve_prompts=ko["preserve_prompts"], preserve_edits=ko["preserve_edits"],
             document_start=s["document_start"], _context_templates=doc["context_templates"],
             _null_spaces=null_spaces)
    for layer, f in ed.factors.items():
        if _factor_fingerprint(f) != doc["stats"].get(str(layer)):
            raise CacheError(f"{folder} was made with other statistics at layer {layer} (another model, corpus or "
                             "token count): reopen it with the statistics it was made with")
    base, _ = read_safetensors(folder / "base.safetensors", "editor base weights")
    if {n: weight_fingerprint(w) for n, w in base.items()} != doc["base"]:
        raise CacheError(f"{folder}/base.safetensors does not hold the weights editor.json records")
    device = adapter.weight(ed.layers[0]).device
    batches = []
    for i, entry in enumerate(doc["batches"]):
        requests, values, edits = _read_batch(folder / entry["file"], device)
        batches.append(EditedBatch(requests, edits, values, entry["after"]))
    now = {name: weight_fingerprint(model.get_submodule(name).weight) for name in doc["base"]}
    last = batches[-1].after if batches else doc["base"]
    if now != doc["base"] and now != last:
        raise CacheError(f"the model's edited weights are neither the unedited ones {folder} was made on nor the "
                         "ones it left: it belongs to another model, checkpoint or dtype, or was edited since")
    for name, w in base.items():
        ed.originals[name] = w.to(ed.originals[name].device)
    ed.base = dict(doc["base"])
    if now == last:
        ed.batches = batches
    else:  # the unedited model: its batches put back, checked against the log
        ed._rebuild(batches)
    ed._call = doc.get("call")
    ed.state_dir = folder if keep_saving else None
    return ed



def saved_settings(folder: Path) -> dict[str, Any]:
    """The settings of the editor saved in ``folder`` (method, retention, layers, ...), read
    without opening it."""
    return dict(_read_json(Path(folder))["settings"])
