"""The demo world: coloured shapes on plain backgrounds with captions, generated on the fly.

Every sample is a pure function of (seed, index): no files, no global RNG. An image shows one
shape (circle, square, triangle, diamond) in one of 6 colours, small or large, in one of 5
positions, on one of 4 backgrounds that is never the shape's colour, drawn in one of 2 styles:
"plain" (filled) or "outlined" (hollow, thick outline). Small jitter in position, size and colour
keeps the task non-trivial while every attribute stays unambiguous.

Caption convention (one grammar, parsed back by `parse_caption`):
    "a small red circle at the top left on a blue background"            content caption
    "a small red circle at the top left on a blue background, outlined"  with the style word
The style word is appended only when asked (`style_word=True`). The demo teacher is trained on
the plain style; the style LoRA is trained on outlined images with content captions WITHOUT the
style word, so the LoRA (not a word) carries the style: with style LoRA + LCM-LoRA any content
prompt comes out outlined, which is the style-composition experiment (LCM-LoRA report Eqs. 2-3, Fig. 3; docs/method.md Sec. 6).
"""

import dataclasses
import itertools
import random

import torch

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (220, 38, 38), "green": (34, 170, 68), "blue": (37, 99, 235),          # sRGB 0..255
           "yellow": (250, 204, 21), "purple": (147, 51, 234), "cyan": (6, 190, 212)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
               "blue": COLOURS["blue"]}
SIZES = {"small": 0.11, "large": 0.18}                                  # base radius / image side
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3),          # centre (x, y), y down
             "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}
STYLES = ("plain", "outlined")
STYLE_WORD = ", outlined"             # suffix naming the outlined style when style_word=True
OUTLINE = 0.4                         # outline thickness / the shape's inradius
JITTER_POS, JITTER_SIZE, JITTER_RGB = 0.03, 0.10, 0.05  # +- image sides, relative, [-1,1] units

#----------------------------------------------------------------------------
# Attributes and their vocabulary (label indices are positions in these tuples).

@dataclasses.dataclass(frozen=True)
class Attributes:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    style: str = "plain"

    def __post_init__(self):
        for name, values in VOCAB.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(values)}")
        if self.background == self.colour:
            raise ValueError(f"background and shape are both {self.colour}: the shape would vanish")

    def labels(self) -> dict[str, int]:
        """Label index per attribute, as the evaluator's heads number them."""
        return {name: VOCAB[name].index(getattr(self, name)) for name in VOCAB}


VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES),
    "position": tuple(POSITIONS), "background": tuple(BACKGROUNDS), "style": STYLES}
CONTENT = ("shape", "colour", "size", "position", "background")   # what a content prompt names


def world_spec() -> dict:
    """Every constant that defines the world: weights trained on it store this and check it."""
    return dict(vocab=VOCAB, colours=COLOURS, backgrounds=BACKGROUNDS, sizes=SIZES,
                positions=POSITIONS, inradius=INRADIUS, outline=OUTLINE, style_word=STYLE_WORD,
                jitter=[JITTER_POS, JITTER_SIZE, JITTER_RGB])


def sample_attributes(rng: random.Random, style: str = "plain") -> Attributes:
    """Uniform attributes; background uniform among those that differ from the colour."""
    assert style in ("plain", "outlined", "both"), style
    colour = rng.choice(VOCAB["colour"])
    return Attributes(
        shape=rng.choice(SHAPES), colour=colour, size=rng.choice(VOCAB["size"]),
        position=rng.choice(VOCAB["position"]),
        background=rng.choice([b for b in BACKGROUNDS if b != colour]),
        style=rng.choice(STYLES) if style == "both" else style)

#----------------------------------------------------------------------------
# Captions: one grammar, both directions.

def _where(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def caption(attrs: Attributes, style_word: bool = False) -> str:
    """'a small red circle at the top left on a blue background' (+ ', outlined' if asked)."""
    text = (f"a {attrs.size} {attrs.colour} {attrs.shape} {_where(attrs.position)} "
            f"on a {attrs.background} background")
    return text + STYLE_WORD if style_word and attrs.style == "outlined" else text


_CAPTIONS = {caption(Attributes(s, c, z, p, b)): (s, c, z, p, b)
             for s, c, z, p, b in itertools.product(*(VOCAB[k] for k in CONTENT)) if b != c}


def parse_caption(text: str) -> Attributes:
    """Inverse of `caption`; style is 'outlined' iff the style word is present, else 'plain'."""
    body = text.strip().lower()
    style = "outlined" if body.endswith(STYLE_WORD) else "plain"
    body = body.removesuffix(STYLE_WORD)
    if body not in _CAPTIONS:
        raise ValueError(f"not a demo-world caption: {text!r}; expected e.g. "
                         f"'a small red circle at the top left on a blue background[{STYLE_WORD}]'")
    return Attributes(*_CAPTIONS[body], style=style)

#----------------------------------------------------------------------------
# Rendering: signed distance of the shape on the pixel grid, anti-aliased coverage.

INRADIUS = {"circle": 1.0, "square": 0.9, "diamond": 1.25 / 2**0.5, "triangle": 1.45 / 2}  # / r


def sdf(shape: str, dx: torch.Tensor, dy: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (pixels, < 0 inside; exact inside) to a shape of base radius r at 0."""
    if shape == "circle":
        return (dx**2 + dy**2).sqrt() - r
    if shape == "square":                                   # half side 0.9 r: area ~ circle's
        return torch.maximum(dx.abs(), dy.abs()) - 0.9 * r
    if shape == "diamond":                                  # half diagonal 1.25 r
        return (dx.abs() + dy.abs() - 1.25 * r) / 2**0.5
    assert shape == "triangle", shape                       # apex up, circumradius R = 1.45 r
    R = 1.45 * r
    dy = dy - R / 4                                         # centre the bounding box, not the centroid
    d = torch.maximum(dy, torch.maximum(0.866 * dx - 0.5 * dy, -0.866 * dx - 0.5 * dy))
    return d - R / 2                                        # inradius R/2


def render(attrs: Attributes, size: int = 64, rng: random.Random | None = None) -> torch.Tensor:
    """Image (3, size, size) in [-1, 1]; rng draws the jitter (None: no jitter)."""
    u = (lambda a: rng.uniform(-a, a)) if rng is not None else (lambda a: 0.0)
    cx, cy = POSITIONS[attrs.position]
    cx, cy = (cx + u(JITTER_POS)) * size, (cy + u(JITTER_POS)) * size
    r = SIZES[attrs.size] * (1 + u(JITTER_SIZE)) * size
    fg = torch.tensor([c / 127.5 - 1 + u(JITTER_RGB) for c in COLOURS[attrs.colour]])
    bg = torch.tensor([c / 127.5 - 1 + u(JITTER_RGB) for c in BACKGROUNDS[attrs.background]])
    grid = torch.arange(size, dtype=torch.float32) + 0.5    # pixel centres
    d = sdf(attrs.shape, grid[None, :] - cx, grid[:, None] - cy, r)  # (H, W)
    alpha = (0.5 - d).clamp(0, 1)                           # coverage of {d <= 0}, 1-pixel ramp
    if attrs.style == "outlined":
        t = OUTLINE * INRADIUS[attrs.shape] * r             # thickness: same hole shape for all
        alpha = alpha - (0.5 - d - t).clamp(0, 1)           # minus the interior {d <= -t}
    out = bg[:, None, None] + alpha * (fg - bg)[:, None, None]
    return out.clamp(-1, 1)

#----------------------------------------------------------------------------
# Dataset and evaluation prompts.

def sample_rng(seed: int, index: int) -> random.Random:
    """The RNG of sample `index` of world `seed` (string seeds hash with SHA-512: stable)."""
    return random.Random(f"demo-world/{seed}/{index}")


def sample(seed: int, index: int, style: str = "plain", resolution: int = 64
           ) -> tuple[Attributes, torch.Tensor]:
    """Attributes and image (3, H, W) of sample `index`, a pure function of its arguments."""
    rng = sample_rng(seed, index)
    attrs = sample_attributes(rng, style)
    return attrs, render(attrs, resolution, rng)


class DemoDataset(torch.utils.data.Dataset):
    """dict(image (3,H,W) in [-1,1], caption str, attrs dict[str,str], labels dict[str,int])."""

    def __init__(self, length: int = 100_000, seed: int = 0, style: str = "plain",
                 resolution: int = 64, style_word: bool = False):
        if style not in ("plain", "outlined", "both"):
            raise ValueError(f"style={style!r}: use 'plain', 'outlined' or 'both'")
        if style == "both" and not style_word:
            raise ValueError("style='both' needs style_word=True, or captions cannot tell styles apart")
        self.length, self.seed, self.style = length, seed, style
        self.resolution, self.style_word = resolution, style_word

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        attrs, image = sample(self.seed, index, self.style, self.resolution)
        return dict(image=image, caption=caption(attrs, self.style_word),
                    attrs=dataclasses.asdict(attrs), labels=attrs.labels())


def real_batch(n: int, seed: int, style: str = "plain", resolution: int = 64, start: int = 0
               ) -> tuple[torch.Tensor, list[Attributes]]:
    """n real images (n, 3, H, W) and their attributes: samples start..start+n-1 of world `seed`."""
    pairs = [sample(seed, i, style, resolution) for i in range(start, start + n)]
    return torch.stack([img for _, img in pairs]), [a for a, _ in pairs]


def fixed_prompt_set(n: int, seed: int = 0) -> list[str]:
    """n content captions: a seeded permutation of all 920 valid ones (cycles beyond 920)."""
    names = sorted(_CAPTIONS)                                # 4 shapes*2 sizes*5 positions*23 pairs
    random.Random(f"demo-prompts/{seed}").shuffle(names)
    return [names[i % len(names)] for i in range(n)]
