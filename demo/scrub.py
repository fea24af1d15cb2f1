"""Scrub machine paths from the metadata of safetensors files (the bundled assets): every path a value
holds becomes its base name (lcm.runs.logger.portable, the rule exports follow); tensors are untouched.

    python -m demo.scrub                          # assets/*.safetensors, in place
    python -m demo.scrub a.safetensors --check    # list what would change, write nothing

Each file is rewritten only if its metadata changes; the tensors are read back and compared bit for
bit with the originals before the new file replaces the old one.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lcm.runs.logger import CHECKOUT, portable

#----------------------------------------------------------------------------


def scrub_metadata(meta: dict[str, str], roots: tuple[str, ...] = (CHECKOUT,)) -> dict[str, str]:
    """Metadata with paths as base names: JSON values (objects, lists) inside, plain strings as a whole.
    A value that does not change keeps its exact text."""
    out = {}
    for k, v in meta.items():
        try:
            obj = json.loads(v)
        except ValueError:
            obj = None
        if isinstance(obj, (dict, list)):
            new = portable(obj, roots)
            out[k] = v if new == obj else json.dumps(new)
        else:
            out[k] = portable(v, roots)
    return out


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same names, dtypes, shapes and bytes (NaN- and -0.0-proof)."""
    bits = lambda t: t.contiguous().view(-1).view(torch.uint8)   # noqa: E731
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and torch.equal(bits(a[k]), bits(b[k])) for k in a)


def scrub_file(path: str, write: bool = True) -> dict[str, tuple[str, str]]:
    """Rewrite `path` with scrubbed metadata (tensors bit-identical, checked); returns {key: (old, new)}."""
    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
    new = scrub_metadata(meta)
    changed = {k: (meta[k], new[k]) for k in meta if new[k] != meta[k]}
    if not changed or not write:
        return changed
    tensors = load_file(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.path.basename(path)}-{os.getpid()}")
    try:
        save_file(tensors, tmp, metadata=new)
        with safe_open(tmp, framework="pt") as f:
            assert dict(f.metadata() or {}) == new, f"{tmp}: metadata not written as given"
        if not same_bits(tensors, load_file(tmp)):
            raise RuntimeError(f"{path}: tensors changed in the rewrite; the original is kept")
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if not same_bits(tensors, load_file(path)):
        raise RuntimeError(f"{path}: tensors differ after the rewrite")
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", help="safetensors files (default: assets/*.safetensors)")
    ap.add_argument("--check", action="store_true", help="report what would change, write nothing")
    a = ap.parse_args()
    paths = a.paths or sorted(glob.glob(os.path.join(CHECKOUT, "assets", "*.safetensors")))
    for path in paths:
        changed = scrub_file(path, write=not a.check)
        for k, (old, new) in changed.items():
            print(f"{path}: {k}: {len(old)} -> {len(new)} chars")
        print(f"{path}: {'unchanged' if not changed else 'would change' if a.check else 'rewritten'}")


if __name__ == "__main__":
    main()
