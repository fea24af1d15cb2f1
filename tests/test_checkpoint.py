"""Safe reading of untrusted files and family detection from keys and shapes (no weights needed)."""
import json
import logging
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from models import checkpoint as ckpt

P = ckpt.UNET_PREFIX


def _attn_keys(blocks: dict[int, int], ctx: int, ch: int = 8) -> dict:
    """A synthetic UNet key set: {input block index: transformer depth}, context width ctx."""
    sd = {}
    for i, depth in blocks.items():
        for k in range(depth):
            sd[f"{P}input_blocks.{i}.1.transformer_blocks.{k}.attn2.to_k.weight"] = torch.empty(ch, ctx, device="meta")
    sd[f"{P}input_blocks.8.0.in_layers.2.weight"] = torch.empty(1, device="meta")
    return sd


SDXL = {4: 2, 5: 2, 7: 10, 8: 10}


@pytest.mark.parametrize("blocks,ctx,label,family", [
    ({1: 1, 2: 1, 4: 1, 5: 1, 7: 1, 8: 1}, 768, False, "sd15"),
    ({1: 1, 2: 1, 4: 1, 5: 1, 7: 1, 8: 1}, 1024, False, "sd21"),
    (SDXL, 2048, True, "sdxl"),
    ({4: 2, 5: 2, 7: 4, 8: 4}, 2048, True, "ssd1b"),
])
def test_family_from_keys_and_shapes(blocks, ctx, label, family):
    sd = _attn_keys(blocks, ctx)
    if label:
        sd[f"{P}label_emb.0.0.weight"] = torch.empty(8, 2816, device="meta")
    assert ckpt.detect_family(sd) == family


def test_unknown_width_and_non_sd_files_are_named():
    with pytest.raises(ValueError, match="512 matches no known family"):
        ckpt.detect_family(_attn_keys({1: 1}, 512))
    with pytest.raises(ValueError, match="no UNet weights"):
        ckpt.detect_family({"encoder.conv_in.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="no label_emb"):
        ckpt.detect_family(_attn_keys(SDXL, 2048))


class Payload:
    """A pickle that would create a marker file when unpickled."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload(str(marker))}, path)
    with pytest.raises(ValueError, match="refused.*Nothing was executed"):
        ckpt.load_file(str(path))
    assert not marker.exists()


def test_plain_pickle_of_tensors_loads(tmp_path):
    path = tmp_path / "ok.ckpt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, path)
    sd, meta = ckpt.load_file(str(path))
    assert torch.equal(sd["w"], torch.arange(3.0)) and meta == {}


def test_truncated_and_corrupt_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path), metadata={"a": "b"})
    sd, meta = ckpt.load_file(str(path))
    assert sd["w"].shape == (64, 64) and meta == {"a": "b"}
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load_file(str(path))
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load_file(str(path))


def test_header_that_lies_about_shapes_or_size(tmp_path):
    lie = tmp_path / "lie.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}}).encode()
    lie.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ckpt.load_file(str(lie))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(ValueError, match="header claims"):
        ckpt.load_file(str(huge))


def test_missing_file_folder_and_extension(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ckpt.load_file(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match="is a folder"):
        ckpt.load_file(str(tmp_path))
    (tmp_path / "x.onnx").write_bytes(b"0")
    with pytest.raises(ValueError, match="unknown checkpoint extension"):
        ckpt.load_file(str(tmp_path / "x.onnx"))


def test_nan_weights_warn(caplog):
    with caplog.at_level(logging.WARNING):
        ckpt.check_finite({"a": torch.tensor([1.0, float("nan")]), "b": torch.ones(2)}, "file")
    assert "NaN/Inf" in caplog.text and "a" in caplog.text


def test_ignored_entries_are_dropped_others_kept():
    sd = {"model_ema.decay": 1, "betas": 1, "alphas_cumprod": 1, "cond_stage_model.transformer."
          "text_model.embeddings.position_ids": 1, "model.diffusion_model.out.2.weight": 1}
    assert list(ckpt.drop_ignored(sd)) == ["model.diffusion_model.out.2.weight"]
