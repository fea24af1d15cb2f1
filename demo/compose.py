"""The compositional tier of the demo world: two shapes and a spatial relation, on white.

Every sample is a pure function of (seed, index): no files, no global RNG. Caption grammar (`caption`,
back with `parse_caption`): "a <size> <colour> <shape> <relation> a <size> <colour> <shape>", e.g.
"a small red circle to the left of a large blue square". Object 1 is named first; the relation says
where it is relative to object 2. Each object has a shape (demo.world.SHAPES), a colour
(demo.world.COLOURS) and a size; the two may share any two of these, never all three.
Unambiguous relations: along the relation's axis the objects' boxes are >= GAP * R apart (so never
overlap), and the offset across the axis is <= DOMINANCE times the one along it (within ~27 degrees).
Held-out combinations: the (shape, colour) pairs HELDOUT never occur in split="train" (the data of the
teacher and its text towers); every split="heldout" sample holds one or two; split="all" draws all.
SDXL micro-conditioning: the composition is laid out in an (R, R) frame centred on a canvas of random
original size (h, w), sides in [R, CANVAS_MAX * R]; the image is the (R, R) crop at (top, left)
(original pixels) among those keeping both objects whole and off the border. Crop only, no resize: an
object's pixel size is the same in every image, so small and large stay unambiguous. micro=False
(original (R, R), crop (0, 0)) gives the frame itself: a centred composition.
"""

import dataclasses
import itertools
import math
import random
import re

import torch

from demo.world import BACKGROUNDS, COLOURS, JITTER_RGB, JITTER_SIZE, SHAPES, sdf

SIZES = {"small": 0.09, "large": 0.13}                   # base radius / R (world.SIZES is for one shape)
RELATIONS = ("to the left of", "to the right of", "above", "below")
CANONICAL = ("to the left of", "above")                  # the spatially first object (left / top) is named first
HELDOUT = (("circle", "green"), ("square", "purple"), ("triangle", "red"), ("diamond", "yellow"))
BACKGROUND = "white"
EXTENT = {"circle": (1.0, 1.0), "square": (0.9, 0.9),    # half width, half height / r of world.sdf's shapes
          "diamond": (1.25, 1.25), "triangle": (0.866 * 1.45, 0.75 * 1.45)}
AA = 1.5             # px added to each extent: anti-aliasing ramp + the polygons' sdf overshoot at vertices
GAP = 0.06           # clear space between the boxes along the relation's axis / R
DOMINANCE = 0.5      # |offset across the axis| <= DOMINANCE * offset along it
CANVAS_MAX = 1.5     # original sides are uniform integers in [R, CANVAS_MAX * R]
SPLITS = ("train", "heldout", "all")
_WIDEST = max(SIZES.values()) * (1 + JITTER_SIZE) * max(max(e) for e in EXTENT.values())   # / R
MIN_RESOLUTION = math.ceil(4 * AA / (1 - 4 * _WIDEST - GAP))   # two widest objects still fit side by side

#----------------------------------------------------------------------------
# Attributes: two objects and a relation (label indices are positions in HEADS' tuples).

OBJECT_VOCAB = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}


@dataclasses.dataclass(frozen=True)
class Object:
    shape: str
    colour: str
    size: str

    def __post_init__(self):
        for name, values in OBJECT_VOCAB.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {list(values)}")


@dataclasses.dataclass(frozen=True)
class Attributes:
    first: Object            # named first in the caption
    second: Object
    relation: str            # where `first` is relative to `second`

    def __post_init__(self):
        if self.relation not in RELATIONS:
            raise ValueError(f"relation={self.relation!r} is not one of {list(RELATIONS)}")
        if self.first == self.second:
            raise ValueError(f"both objects are a {self.first.size} {self.first.colour} {self.first.shape}: "
                             "they must differ in shape, colour or size")

    @property
    def heldout(self) -> bool:
        return (self.first.shape, self.first.colour) in HELDOUT or (self.second.shape, self.second.colour) in HELDOUT

    def canonical(self) -> "Attributes":
        """The same scene described left-to-right / top-to-bottom ('right of' and 'below' swap objects)."""
        if self.relation in CANONICAL:
            return self
        return Attributes(self.second, self.first, CANONICAL[RELATIONS.index(self.relation) // 2])

    def flat(self) -> dict[str, str]:
        """Caption order: shape1, colour1, size1, shape2, colour2, size2, relation."""
        return {f"{k}{i}": getattr(o, k) for i, o in ((1, self.first), (2, self.second)) for k in OBJECT_VOCAB
                } | {"relation": self.relation}

    def labels(self) -> dict[str, int]:
        """Label index per evaluator head: the canonical description, well defined by the image alone."""
        return {k: HEADS[k].index(v) for k, v in self.canonical().flat().items()}


HEADS: dict[str, tuple] = {f"{k}{i}": v for i in (1, 2) for k, v in OBJECT_VOCAB.items()} | {"relation": CANONICAL}


def world_spec() -> dict:
    """Every constant that defines the world: weights trained on it store this and check it."""
    return dict(heads=HEADS, relations=RELATIONS, colours=COLOURS, background=BACKGROUNDS[BACKGROUND],
                sizes=SIZES, extent=EXTENT, aa=AA, gap=GAP, dominance=DOMINANCE, canvas_max=CANVAS_MAX,
                heldout=HELDOUT, jitter=[JITTER_SIZE, JITTER_RGB])


def check_args(split: str = "all", resolution: int = MIN_RESOLUTION) -> None:
    """A ValueError naming the fix for an unknown split or a resolution too small for two large objects."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {list(SPLITS)}")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution={resolution}: the compose world needs >= {MIN_RESOLUTION} px")


def in_split(attrs: Attributes, split: str) -> bool:
    """train: no held-out pair; heldout: at least one; all: anything."""
    check_args(split)
    return split == "all" or attrs.heldout == (split == "heldout")


def sample_attributes(rng: random.Random, split: str = "train") -> Attributes:
    """Uniform over the split's valid attribute pairs (rejection sampling)."""
    while True:
        first, second = (Object(rng.choice(SHAPES), rng.choice(tuple(COLOURS)), rng.choice(tuple(SIZES)))
                         for _ in range(2))
        relation = rng.choice(RELATIONS)
        if first != second and in_split(attrs := Attributes(first, second, relation), split):
            return attrs

#----------------------------------------------------------------------------
# Captions: one grammar, both directions.

def caption(attrs: Attributes) -> str:
    """'a small red circle to the left of a large blue square'."""
    o1, o2 = attrs.first, attrs.second
    return f"a {o1.size} {o1.colour} {o1.shape} {attrs.relation} a {o2.size} {o2.colour} {o2.shape}"


_OBJ = r"a ({}) ({}) ({})".format(*("|".join(OBJECT_VOCAB[k]) for k in ("size", "colour", "shape")))
_GRAMMAR = re.compile(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}")


def parse_caption(text: str) -> Attributes:
    """Inverse of `caption`."""
    m = _GRAMMAR.fullmatch(" ".join(text.strip().lower().split()))
    if m is None:
        raise ValueError(f"not a compose-world caption: {text!r}; expected 'a <size> <colour> <shape> <relation> "
                         f"a <size> <colour> <shape>' (size {list(SIZES)}, colour {list(COLOURS)}, shape "
                         f"{list(SHAPES)}, relation {list(RELATIONS)}), e.g. 'a small red circle to the left of a "
                         "large blue square'")
    z1, c1, s1, rel, z2, c2, s2 = m.groups()                              # size, colour, shape
    return Attributes(Object(s1, c1, z1), Object(s2, c2, z2), rel)

#----------------------------------------------------------------------------
# Scenes: the layout in the (R, R) frame, the canvas around it and the crop.

@dataclasses.dataclass(frozen=True)
class Scene:
    attrs: Attributes
    centres: tuple[tuple[float, float], ...]   # (x, y) of objects 1, 2 in frame pixels, y down
    radii: tuple[float, ...]                   # base radius (px) of objects 1, 2
    rgb: tuple[tuple[float, ...], ...]         # objects 1, 2 and the background, [-1, 1]
    resolution: int                            # R
    original_size: tuple[int, int]             # (h, w) of the canvas
    crop_top_left: tuple[int, int]             # (top, left) of the (R, R) crop, canvas pixels

    @property
    def frame_offset(self) -> tuple[int, int]:                # (top, left) of the frame on the canvas: centred
        (h, w), R = self.original_size, self.resolution
        return (h - R) // 2, (w - R) // 2


def _extent(shape: str, r: float) -> tuple[float, float]:
    return EXTENT[shape][0] * r + AA, EXTENT[shape][1] * r + AA


def _layout(attrs: Attributes, rng: random.Random, R: int) -> tuple[tuple, tuple]:
    """Centres and radii of both objects in the frame, satisfying the relation with GAP and DOMINANCE."""
    objs = (attrs.first, attrs.second)
    radii = tuple(SIZES[o.size] * (1 + rng.uniform(-JITTER_SIZE, JITTER_SIZE)) * R for o in objs)
    ext = [_extent(o.shape, r) for o, r in zip(objs, radii)]
    axis = 0 if attrs.relation in RELATIONS[:2] else 1                    # 0: x (left/right), 1: y
    lo, hi = (0, 1) if attrs.relation in CANONICAL else (1, 0)            # lo: the left / top object
    e_lo, e_hi, gap = ext[lo][axis], ext[hi][axis], GAP * R
    slack = R - 2 * e_lo - 2 * e_hi - gap
    assert slack > 0, (attrs, slack)
    a, b = sorted((rng.uniform(0, slack), rng.uniform(0, slack)))      # slack split uniformly in 3 parts
    along = [0.0, 0.0]
    along[lo], along[hi] = a + e_lo, a + 2 * e_lo + gap + (b - a) + e_hi     # left slack a, extra gap b - a
    c = 1 - axis
    for _ in range(100):                                                  # across: uniform, within DOMINANCE
        across = [rng.uniform(e[c], R - e[c]) for e in ext]
        if abs(across[0] - across[1]) <= DOMINANCE * (along[hi] - along[lo]):
            break
    else:                                                                 # (never seen; bounded anyway)
        across[1] = min(max(across[0], ext[1][c]), R - ext[1][c])
    centres = tuple((along[i], across[i]) if axis == 0 else (across[i], along[i]) for i in range(2))
    return centres, radii


def _crop_range(scene: Scene, axis: int) -> tuple[int, int]:
    """Crop offsets along axis (0: top, 1: left) keeping both objects whole and off the crop's border."""
    R, off = scene.resolution, scene.frame_offset[axis]
    boxes = [(xy[1 - axis] + off, _extent(o.shape, r)[1 - axis])
             for xy, r, o in zip(scene.centres, scene.radii, (scene.attrs.first, scene.attrs.second))]
    lo, hi = min(c - e for c, e in boxes), max(c + e for c, e in boxes)
    return max(0, math.ceil(hi) - R), min(scene.original_size[axis] - R, math.floor(lo))


def make_scene(attrs: Attributes, rng: random.Random, resolution: int = 64, micro: bool = True) -> Scene:
    """Layout and colour jitter, then (micro) the original size and the crop, drawn from rng in that order."""
    check_args("all", R := resolution)
    centres, radii = _layout(attrs, rng, R)
    u = lambda: rng.uniform(-JITTER_RGB, JITTER_RGB)                     # noqa: E731
    rgb = tuple(tuple(v / 127.5 - 1 + u() for v in rgb) for rgb in
                (COLOURS[attrs.first.colour], COLOURS[attrs.second.colour], BACKGROUNDS[BACKGROUND]))
    if not micro:
        return Scene(attrs, centres, radii, rgb, R, (R, R), (0, 0))
    size = (rng.randint(R, int(CANVAS_MAX * R)), rng.randint(R, int(CANVAS_MAX * R)))
    scene = Scene(attrs, centres, radii, rgb, R, size, (0, 0))
    crop = tuple(rng.randint(*_crop_range(scene, axis)) for axis in (0, 1))
    return dataclasses.replace(scene, crop_top_left=crop)

#----------------------------------------------------------------------------
# Rendering: world.sdf per object on the canvas, anti-aliased coverage, composited on the background.

def coverage(scene: Scene) -> torch.Tensor:
    """Coverage (2, h, w) in [0, 1] of objects 1, 2 on the whole canvas."""
    (h, w), (oy, ox) = scene.original_size, scene.frame_offset
    ys, xs = torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5
    d = [sdf(o.shape, xs[None, :] - (cx + ox), ys[:, None] - (cy + oy), r)     # (h, w) each
         for (cx, cy), r, o in zip(scene.centres, scene.radii, (scene.attrs.first, scene.attrs.second))]
    return (0.5 - torch.stack(d)).clamp(0, 1)                                   # 1-pixel ramp, as world.render


def render_canvas(scene: Scene) -> torch.Tensor:
    """The whole canvas (3, h, w) in [-1, 1]."""
    fg1, fg2, bg = (torch.tensor(c)[:, None, None] for c in scene.rgb)
    a1, a2 = coverage(scene)[:, None]                                            # disjoint: order is moot
    return (bg + a1 * (fg1 - bg) + a2 * (fg2 - bg)).clamp(-1, 1)


def render(scene: Scene) -> torch.Tensor:
    """The image (3, R, R): the crop of the canvas."""
    (top, left), R = scene.crop_top_left, scene.resolution
    return render_canvas(scene)[:, top:top + R, left:left + R]

#----------------------------------------------------------------------------
# Dataset and evaluation prompts.

def sample_rng(seed: int, index: int) -> random.Random:
    """The RNG of sample `index` of world `seed` (string seeds hash with SHA-512: stable)."""
    return random.Random(f"compose-world/{seed}/{index}")


def sample(seed: int, index: int, split: str = "train", resolution: int = 64, micro: bool = True
           ) -> tuple[Scene, torch.Tensor]:
    """Scene and image (3, R, R) of sample `index`, a pure function of its arguments."""
    rng = sample_rng(seed, index)
    scene = make_scene(sample_attributes(rng, split), rng, resolution, micro)
    return scene, render(scene)


class ComposeDataset(torch.utils.data.Dataset):
    """dict(image (3,R,R) in [-1,1], caption, original_size (h, w), crop_top_left (top, left),
    attrs (caption order, Attributes.flat), labels (the evaluator's canonical heads))."""

    def __init__(self, length: int = 100_000, seed: int = 0, resolution: int = 64, split: str = "train", micro=True):
        check_args(split, resolution)
        self.length, self.seed, self.resolution, self.split, self.micro = length, seed, resolution, split, micro

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        scene, image = sample(self.seed, index, self.split, self.resolution, self.micro)
        return dict(image=image, caption=caption(scene.attrs), original_size=scene.original_size,
                    crop_top_left=scene.crop_top_left, attrs=scene.attrs.flat(), labels=scene.attrs.labels())


def real_batch(n: int, seed: int, split: str = "train", resolution: int = 64, start: int = 0,
               micro: bool = True) -> tuple[torch.Tensor, list[Attributes]]:
    """n real images (n, 3, R, R) and their attributes: samples start..start+n-1 of world `seed`."""
    pairs = [sample(seed, i, split, resolution, micro) for i in range(start, start + n)]
    return torch.stack([img for _, img in pairs]), [s.attrs for s, _ in pairs]


def all_attributes(split: str = "all") -> list[Attributes]:
    """Every valid attribute pair of the split (9024 in all: 48 * 47 ordered objects * 4 relations)."""
    objs = [Object(*v) for v in itertools.product(*OBJECT_VOCAB.values())]
    return [a for o1, o2 in itertools.permutations(objs, 2) for r in RELATIONS
            if in_split(a := Attributes(o1, o2, r), split)]


def fixed_prompt_set(n: int, seed: int = 0, split: str = "train") -> list[str]:
    """n captions of the split (train: seen pairs only; heldout: >= 1 held-out pair): a seeded
    permutation of all of them (6240 train, 2784 heldout), cycled beyond that."""
    names = sorted(caption(a) for a in all_attributes(split))
    random.Random(f"compose-prompts/{split}/{seed}").shuffle(names)
    return [names[i % len(names)] for i in range(n)]
