"""Where the original full-precision weights come from: the checkpoint, streamed per tensor.

A 4-bit model no longer holds its original weights. QOLoRA reads each target weight back
from the checkpoint's safetensors files, one tensor at a time and memory-mapped, so the QR
runs on the original weight and the residual is quantized once (docs/design.md, invariant 4).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .._io import sha256_file

logger = logging.getLogger(__name__)

FINGERPRINT_METHOD = "sha256"
_CHUNK = 8 << 20


class CheckpointWeights:
    """Read-only, memory-mapped access to the tensors of a safetensors checkpoint folder.

    Only headers are read up front; ``get`` loads one tensor.

    Args:
        folder: a folder with ``model.safetensors`` or sharded ``*.safetensors`` files.

    Raises:
        FileNotFoundError: naming the folder, when it holds no safetensors file.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        files = safetensors_files(self.folder)
        if not files:
            raise FileNotFoundError(f"{self.folder}: no *.safetensors weight files found")
        self.files = files
        self._key_to_file: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():
                    self._key_to_file[key] = f

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file or key in self.views

    def keys(self) -> list[str]:
        """The stored keys (not the per-expert ``views``)."""
        return list(self._key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        view = self.views.get(key)
        if view is None:
            return self._stored_shape(key)
        inner = self._stored_shape(view.stored)[1:]
        inner = inner[::-1] if view.transposed else inner
        return (inner[0] // view.parts, *inner[1:])

    def _stored_shape(self, key: str) -> tuple[int, ...]:
        with safe_open(str(self._key_to_file[key]), framework="pt") as h:
            return tuple(h.get_slice(key).get_shape())

    def get(
        self, key: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32
    ) -> torch.Tensor:
        """One tensor on ``device``, as ``dtype`` (float32 by default; None keeps the stored dtype).
        A per-expert view reads its expert's slice of the stored tensor only."""
        view = self.views.get(key)
        stored = view.stored if view else key
        if stored not in self._key_to_file:
            raise KeyError(f"{self.folder}: tensor {key!r} is not in the checkpoint")
        with safe_open(str(self._key_to_file[stored]), framework="pt", device="cpu") as h:
            if view is None:
                t = h.get_tensor(key)
            elif view.transposed:  # stored (in, out): the expert's matrix, transposed (one part)
                t = h.get_slice(stored)[view.expert].T.chunk(view.parts, dim=0)[view.part].contiguous()
            else:  # only this part's rows are read (a gated expert's gate or up half)
                sl = h.get_slice(stored)
                rows = sl.get_shape()[1] // view.parts
                t = sl[view.expert, view.part * rows : (view.part + 1) * rows]
        return t.to(device=device, dtype=dtype or t.dtype)

    @functools.cached_property
    def views(self) -> dict[str, Any]:
        """{per-expert key: ``experts.View``} for MoE experts stored fused, which load one linear layer
        per expert matrix (``experts.expert_views``)."""
        from .experts import expert_views, names_for_type

        return expert_views(self.keys(), self._stored_shape, names_for_type(self.model_type))

    def experts_of(self, key: str) -> list[list[str]]:
        """The per-expert views of a stored fused key: one list per expert, in expert order, of its
        views in row order (gate, up); [] for any other key."""
        return self._experts.get(key, [])

    @functools.cached_property
    def _experts(self) -> dict[str, list[list[str]]]:
        out: dict[str, dict[int, list[str]]] = {}
        for k, v in self.views.items():  # in expert order, then row order
            out.setdefault(v.stored, {}).setdefault(v.expert, []).append(k)
        return {stored: list(per.values()) for stored, per in out.items()}

    @functools.cached_property
    def model_type(self) -> str | None:
        """``model_type`` of the folder's config.json, or None."""
        try:
            return json.loads((self.folder / "config.json").read_text()).get("model_type")
        except (OSError, ValueError):
            return None

    def find(self, module_name: str, prefixes: tuple[str, ...] = ()) -> str | None:
        """The checkpoint key of ``module_name``'s weight, or None.

        Args:
            module_name: dotted name inside the transformers model, e.g. ``model.layers.0.mlp.up_proj``.
            prefixes: base-model prefixes ("model", "transformer") that a checkpoint may add or omit.
        """
        key = f"{module_name}.weight"
        candidates = [key]
        for p in prefixes:
            if key.startswith(p + "."):
                candidates.append(key[len(p) + 1 :])
            else:
                candidates.append(f"{p}.{key}")
        found = next((c for c in candidates if c in self._key_to_file), None)
        if found is None:  # a key transformers renames while loading (Mixtral's block_sparse_moe -> mlp)
            found = next((self.renamed[c] for c in candidates if c in self.renamed), None)
        if found is None:  # one expert's matrix of experts stored fused (gpt-oss)
            found = next((c for c in candidates if c in self.views), None)
        return found

    @functools.cached_property
    def renamed(self) -> dict[str, str]:
        """{the model's name for a key: the checkpoint's key}, for the keys the model type's
        renamings change (``experts.checkpoint_renames``)."""
        from .experts import checkpoint_renames, renamed

        renames = checkpoint_renames(self.model_type) if self.model_type else []
        if not renames:
            return {}
        pairs = ((renamed(k, renames), k) for k in self._key_to_file)
        return {r: k for r, k in pairs if r != k}

    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.folder)


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder, from its index when it has one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from e
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def fingerprint(folder: str | os.PathLike[str], progress: bool = True) -> dict[str, Any]:
    """A content fingerprint of a checkpoint's weight files: size and sha256 of each.

    Reads every byte (about 1.5 GB/s per core here: ~9 s for a 7B bf16 checkpoint, which a
    4-bit load reads in full anyway). Sampling a few windows instead would miss small edits.
    """
    folder = Path(folder)
    files = safetensors_files(folder)
    total = sum(f.stat().st_size for f in files)
    out: dict[str, Any] = {}
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="fingerprint", disable=not progress or total < 1 << 30
    ) as bar:
        for f in files:
            out[f.name] = {"size": f.stat().st_size, "sha256": sha256_file(f, bar.update, _CHUNK)}
    return {"method": FINGERPRINT_METHOD, "files": out}


def fingerprint_mismatch(recorded: dict[str, Any], folder: str | os.PathLike[str]) -> str | None:
    """None if ``folder`` still matches ``recorded``, else a sentence saying what changed."""
    folder = Path(folder)
    if recorded.get("method") != FINGERPRINT_METHOD:
        return f"unknown fingerprint method {recorded.get('method')!r}"
    now = fingerprint(folder)["files"]
    then = recorded.get("files", {})
    for name in sorted(set(now) | set(then)):
        if name not in now:
            return f"weight file {folder / name} is missing"
        if name not in then:
            return f"weight file {folder / name} was not part of the base checkpoint"
        if now[name] != then[name]:
            return f"weight file {folder / name} has changed since the adapter was initialized"
    return None


def find_checkpoint(name_or_path: str | None) -> Path | None:
    """The local folder holding a model's safetensors files, or None.

    Looks at a local folder first, then the local Hugging Face cache (never the network).
    """
    if not name_or_path:
        return None
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p.resolve() if safetensors_files(p) else None
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(str(name_or_path), local_files_only=True, allow_patterns=["*.safetensors", "*.json"])
    except Exception as e:  # not cached, malformed id, or no hub library: the caller falls back
        logger.debug("no local checkpoint for %s: %s", name_or_path, e)
        return None
    local_path = Path(local)
    return local_path if safetensors_files(local_path) else None


def resolve_model(path_or_id: str | os.PathLike[str]) -> str:
    """Check that a model reference can be loaded offline, before anything is loaded.

    A local folder must hold ``config.json``; anything else is taken as a hub id and must be
    in the local Hugging Face cache (this project never reaches the hub at run time).

    Returns:
        The reference as a string.

    Raises:
        FileNotFoundError: naming the folder or the hub id and what is missing.
    """
    ref = os.fspath(path_or_id)
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model folder {p} holds no config.json: it is not a Hugging Face model folder")
        return ref
    looks_like_path = ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.path.sep == "\\" and "\\" in ref
    if looks_like_path or p.exists():
        raise FileNotFoundError(f"model folder {p} does not exist")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(ref, "config.json")
    except Exception as e:  # a malformed id raises inside huggingface_hub
        raise FileNotFoundError(f"model {ref!r} is neither a local folder nor a valid hub id ({e})") from e
    if not isinstance(cached, str):
        from huggingface_hub.constants import HF_HUB_CACHE

        raise FileNotFoundError(
            f"model {ref!r} is not a local folder and not in the local Hugging Face cache ({HF_HUB_CACHE}); "
            "this machine is offline: copy the model folder here and pass its path"
        )
    return ref
