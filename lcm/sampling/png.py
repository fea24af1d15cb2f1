"""Image files in and out of sample.py: PNGs written under fresh names (never overwriting) with
their A1111 infotext in the "parameters" chunk (lcm.sampling.infotext), a PNG's parameters read
back (from_png), and the init image of img2img."""
import os
from typing import TYPE_CHECKING

from lcm.sampling import infotext

if TYPE_CHECKING:
    from PIL import Image

#----------------------------------------------------------------------------
# Writing: a reserved name, then the image with its infotext.

def free_path(out_dir: str, stem: str) -> str:
    """Reserve a new file name in out_dir, `stem-NNN.png`: the file is created empty and exclusively
    (O_EXCL), so two processes writing into one folder never get the same name; taken names are
    skipped. The caller writes the image into it (save_png, or PIL's save)."""
    i = 0
    while True:
        path = os.path.join(out_dir, f"{stem}-{i:03d}.png")
        try:
            with open(path, "xb"):                    # atomic: fails if anyone (any process) has the name
                return path
        except FileExistsError:
            i += 1


def save_png(img: "Image.Image", path: str, params: dict | str) -> None:
    """Write img as PNG with its A1111 infotext (a string, or a params dict for format_infotext) in the
    "parameters" text chunk, into a fresh path or one free_path reserved (empty); an existing
    non-empty file is never overwritten."""
    from PIL import PngImagePlugin
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params if isinstance(params, str) else infotext.format_infotext(params))
    try:
        f = open(path, "xb")
    except FileExistsError:
        f = open(path, "r+b")                         # no truncation: checked empty (reserved) first
        if os.fstat(f.fileno()).st_size:
            f.close()
            raise FileExistsError(f"{path} exists; refusing to overwrite it") from None
    with f:
        img.save(f, format="PNG", pnginfo=info)


def check_out_dir(out_dir: str) -> None:
    """A one-line error if out_dir exists and is not a folder (before anything is built)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir={out_dir} exists and is a file; choose a folder")

#----------------------------------------------------------------------------
# Reading.

def read_png(path: str) -> dict:
    """A PNG's "parameters" chunk, parsed (lcm.sampling.infotext.parse_infotext); one-line errors."""
    from PIL import Image
    if not os.path.isfile(path):
        raise FileNotFoundError(f"from_png not found: {path}")
    try:
        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("parameters")
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"from_png={path}: not a readable image ({e})") from None
    if not text:
        raise ValueError(f"from_png={path} has no A1111 'parameters' text chunk (was it written by sample.py?)")
    info = infotext.parse_infotext(text)
    if "Grid rows" in info:
        raise ValueError(f"from_png={path} is a grid image; pass one of its cells' PNGs instead")
    if "Steps" not in info or "Seed" not in info:
        raise ValueError(f"from_png={path}: its parameters have no Steps/Seed line")
    return info


def load_init_image(path: str | None) -> "Image.Image | None":
    """img2img's init image as an RGB PIL image (None: text-to-image); one-line errors."""
    if path is None:
        return None
    from PIL import Image
    if not os.path.isfile(path):
        raise FileNotFoundError(f"init_image not found: {path}")
    try:
        return Image.open(path).convert("RGB")
    except Image.DecompressionBombError as e:          # not an OSError: would be a traceback
        raise ValueError(f"init_image={path}: {e}") from None
