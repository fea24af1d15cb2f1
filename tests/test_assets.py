"""The bundled assets stay small and portable: all of assets/ within 60 MB (the compose tier's issue),
and no file's metadata holds a machine path (python -m demo.scrub --check would change nothing)."""
import glob
import os

import pytest

from demo.scrub import scrub_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "assets", "*")))
BUDGET = 60e6


def test_assets_within_budget():
    total = sum(os.path.getsize(p) for p in FILES)
    assert total <= BUDGET, f"assets/ holds {total / 1e6:.1f} MB > {BUDGET / 1e6:.0f} MB"


@pytest.mark.parametrize("path", [p for p in FILES if p.endswith(".safetensors")], ids=os.path.basename)
def test_asset_metadata_has_no_machine_path(path):
    assert scrub_file(path, write=False) == {}
