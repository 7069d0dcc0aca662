"""A procedural world of coloured shapes: scenes, captions, 32 x 32 images and the train / held-out split.

Four kinds of scene, after the categories GenEval scores real text-to-image models on:

| kind | caption | what a model must get right |
|---|---|---|
| `single` | "a red circle on the left" | one object, its colour, shape and position |
| `pair` | "a green triangle above a yellow circle" | two objects, each colour bound to its shape, their relation |
| `count` | "three blue squares" | how many objects |
| `row` | "a red circle left of a blue square left of a white triangle" | three objects, bound and in order |

Every scene has exactly one caption, and the caption can be parsed back into the scene, so a reward can read the
prompt.

Example:
    >>> from trl_noise_ppo.shapes.render import render_example
    >>> image, caption, labels = render_example(seed=0)
    >>> image.shape
    torch.Size([3, 32, 32])
"""

import itertools
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from PIL import Image, ImageDraw


IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # draw at 4x and downsample, so that edges are anti-aliased like a photo's

COLOURS = {
    "red": (220, 50, 50),
    "green": (50, 180, 70),
    "blue": (60, 90, 230),
    "yellow": (235, 215, 50),
    "purple": (150, 70, 200),
    "white": (235, 235, 235),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
# A single object's position and the phrase that names it in a caption.
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
POSITION_NAMES = tuple(POSITIONS)
# Two or three objects: each is left of / above the next.
RELATIONS = ("left of", "above")
# The classifier's layout classes: where the one object is, how the objects are arranged, or scattered (a count).
LAYOUTS = POSITION_NAMES + RELATIONS + ("scattered",)
KINDS = ("single", "pair", "count", "row")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
MAX_OBJECTS = 5

# A single object's anchor in pixels (x, y), jittered by up to 2 px per axis. Pairs, rows and counts are placed
# anywhere their caption allows, as real photographs are: no template to learn.
_CENTRES = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24), "center": (16, 16)}
_JITTER = 2.0
_RADIUS = {"single": (4.5, 6.5), "pair": (4.0, 6.0), "count": (3.5, 5.0), "row": (3.5, 4.5)}  # pixels, uniform
_GAP = 2.0  # pixels at least between two objects, so that they never touch
_MARGIN = 1.5  # an object along a relation is at least this many times farther along than across
_MIN_ALONG = 8.0  # pixels between centres along a relation
_ROW_SPREAD = 4.0  # pixels: how far an object of a row may sit from the row's height
_COLOUR_JITTER = 20  # per channel, uniform
_BACKGROUND = (25, 25, 30)
_BACKGROUND_JITTER = 10

# A scene is held out of Noise PPO training when the sum of its label indices is divisible by this.
HELD_OUT_MODULUS = 5


@dataclass(frozen=True)
class Scene:
    """(colour, shape) objects and their layout, a member of `LAYOUTS`; a count repeats one object."""

    objects: tuple[tuple[str, str], ...]
    layout: str

    @property
    def kind(self) -> str:
        if self.layout == "scattered":
            return "count"
        return {1: "single", 2: "pair", 3: "row"}[len(self.objects)]

    @property
    def caption(self) -> str:
        (colour, shape), *_ = self.objects
        if self.kind == "single":
            return f"a {colour} {shape} {POSITIONS[self.layout]}"
        if self.kind == "count":
            return f"{NUMBER_WORDS[len(self.objects)]} {colour} {shape}s"
        return f" {self.layout} ".join(f"a {colour} {shape}" for colour, shape in self.objects)

    @property
    def labels(self) -> dict[str, int]:
        """Class indices for the classifier's heads; -1 where the caption states no such attribute."""
        distinct = self.objects[:1] if self.kind == "count" else self.objects
        labels = {"layout": LAYOUTS.index(self.layout), "count": len(self.objects) - 1}
        for slot, name in enumerate("abc"):
            colour, shape = distinct[slot] if slot < len(distinct) else (None, None)
            labels[f"colour_{name}"] = COLOUR_NAMES.index(colour) if colour else -1
            labels[f"shape_{name}"] = SHAPES.index(shape) if shape else -1
        return labels

    @property
    def is_held_out(self) -> bool:
        # A fixed Latin-square-like rule: every colour, shape and layout still appears in training, and each
        # (colour, shape) object is held out at exactly one of the five single-object positions.
        return sum(index for index in self.labels.values() if index >= 0) % HELD_OUT_MODULUS == 0


_OBJECTS = list(itertools.product(COLOUR_NAMES, SHAPES))


@cache
def scenes_of_kind(kind: str) -> tuple[Scene, ...]:
    """Every scene of one kind, in a fixed order: 90 single, 612 pair, 72 count, 3,240 row scenes."""
    if kind == "single":
        return tuple(Scene((obj,), position) for obj, position in itertools.product(_OBJECTS, POSITION_NAMES))
    if kind == "pair":  # two different objects
        pairs = itertools.product(RELATIONS, _OBJECTS, _OBJECTS)
        return tuple(Scene((a, b), relation) for relation, a, b in pairs if a != b)
    if kind == "count":
        return tuple(Scene((obj,) * n, "scattered") for n, obj in itertools.product(NUMBER_WORDS, _OBJECTS))
    if kind == "row":  # three objects of three different colours, left to right
        rows = itertools.permutations(_OBJECTS, 3)
        return tuple(Scene(row, "left of") for row in rows if len({colour for colour, _ in row}) == 3)
    raise ValueError(f"Unknown kind of scene {kind!r}; one of {KINDS}.")


def all_scenes() -> list[Scene]:
    return [scene for kind in KINDS for scene in scenes_of_kind(kind)]


def _prompts(held_out: bool, kinds) -> list[str]:
    kinds = KINDS if kinds is None else kinds
    return [scene.caption for kind in kinds for scene in scenes_of_kind(kind) if scene.is_held_out == held_out]


def training_prompts(kinds: tuple[str, ...] | None = None) -> list[str]:
    """Captions Noise PPO may train on, of the given kinds (default all); the base model saw every scene."""
    return _prompts(False, kinds)


def held_out_prompts(kinds: tuple[str, ...] | None = None) -> list[str]:
    """Captions never used to train Noise PPO, for measuring whether a noise generator generalises."""
    return _prompts(True, kinds)


def balanced_prompts(split: str, num_prompts: int) -> list[str]:
    """`num_prompts` captions of `split` ("training" or "held-out"), the four kinds taking turns, each kind's
    captions in a fixed shuffled order (repeating once used up): every kind weighs the same, as in GenEval."""
    if split not in ("training", "held-out"):
        raise ValueError(f"split must be 'training' or 'held-out', not {split!r}.")
    select = held_out_prompts if split == "held-out" else training_prompts
    orders = [np.random.default_rng(index).permutation(select((kind,))).tolist() for index, kind in enumerate(KINDS)]
    return [orders[i % len(KINDS)][(i // len(KINDS)) % len(orders[i % len(KINDS)])] for i in range(num_prompts)]


@cache
def _scenes_by_caption() -> dict[str, Scene]:
    return {scene.caption: scene for scene in all_scenes()}


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; raises ValueError for a caption outside this world."""
    scene = _scenes_by_caption().get(" ".join(caption.lower().split()))
    if scene is None:
        raise ValueError(f"{caption!r} is not a caption of the shapes world, e.g. {all_scenes()[0].caption!r}.")
    return scene


def sample_scene(rng: np.random.Generator) -> Scene:
    """A scene drawn with the four kinds equally likely, uniform within each."""
    scenes = scenes_of_kind(KINDS[rng.integers(len(KINDS))])
    return scenes[rng.integers(len(scenes))]


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float, fill) -> None:
    x, y, r = (value * _SUPERSAMPLE for value in (*centre, radius))
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "square":
        half = 0.85 * r  # about a circle's area
        draw.rectangle([x - half, y - half, x + half, y + half], fill=fill)
    else:  # an upward triangle inscribed in the circle of radius r, nudged down to centre its area
        dy = 0.25 * r
        draw.polygon([(x, y - r + dy), (x - 0.95 * r, y + 0.6 * r + dy), (x + 0.95 * r, y + 0.6 * r + dy)], fill=fill)


def _in_relation(first, second, layout: str) -> bool:
    along, across = (second[0] - first[0], second[1] - first[1])
    if layout == "above":
        along, across = across, along
    return along >= _MIN_ALONG and along >= _MARGIN * abs(across)


def _placement(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(x, y, radius) of each object, placed one after another where the caption holds with a margin and no two objects
    touch; a placement that gets stuck starts over."""
    if scene.kind == "single":
        x, y = (c + rng.uniform(-_JITTER, _JITTER) for c in _CENTRES[scene.layout])
        return [(x, y, rng.uniform(*_RADIUS["single"]))]
    row_height = rng.uniform(_RADIUS["row"][1] + _ROW_SPREAD + 1, IMAGE_SIZE - _RADIUS["row"][1] - _ROW_SPREAD - 1)
    objects: list[tuple[float, float, float]] = []
    for _ in range(100 * len(scene.objects)):
        if len(objects) == len(scene.objects):
            return objects
        radius = rng.uniform(*_RADIUS[scene.kind])
        x, y = rng.uniform(radius + 1, IMAGE_SIZE - radius - 1, size=2)
        if scene.kind == "row":  # left to right: each object to the right of the last, or start over
            low, high = (objects[-1][0] + _MIN_ALONG if objects else radius + 1), IMAGE_SIZE - radius - 1
            if low > high:
                objects = []
                continue
            x, y = rng.uniform(low, high), row_height + rng.uniform(-_ROW_SPREAD, _ROW_SPREAD)
        candidate = (float(x), float(y), float(radius))
        apart = all(np.hypot(x - other[0], y - other[1]) >= radius + other[2] + _GAP for other in objects)
        ordered = scene.kind == "count" or not objects or _in_relation(objects[-1], candidate, scene.layout)
        if apart and ordered:
            objects.append(candidate)
        elif rng.random() < 0.05:  # stuck, e.g. the first object of a row too far right: start over
            objects = []
    return objects if len(objects) == len(scene.objects) else _placement(scene, rng)


def render_scene(scene: Scene, seed: int) -> torch.Tensor:
    """The scene as a float tensor of shape (3, 32, 32) in [0, 1]; the seed fixes positions, sizes and tints."""
    rng = np.random.default_rng(seed)
    background_tint = np.array(_BACKGROUND) + rng.integers(-_BACKGROUND_JITTER, _BACKGROUND_JITTER + 1, 3)
    background = tuple(int(c) for c in np.clip(background_tint, 0, 255))
    size = IMAGE_SIZE * _SUPERSAMPLE
    canvas = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(canvas)
    for (colour, shape), (x, y, radius) in zip(scene.objects, _placement(scene, rng)):
        tint = np.array(COLOURS[colour]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
        _draw_object(draw, shape, (x, y), radius, tuple(int(c) for c in np.clip(tint, 0, 255)))
    image = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0


def render_example(seed: int, scene: Scene | None = None) -> tuple[torch.Tensor, str, dict[str, int]]:
    """(image, caption, labels) for a seed: the scene is drawn from the seed unless given."""
    rng = np.random.default_rng(seed)
    scene = scene if scene is not None else sample_scene(rng)
    return render_scene(scene, seed=int(rng.integers(2**31))), scene.caption, scene.labels


def render_batch(seeds, scenes=None) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
    """Stacked `render_example`s: images (N, 3, 32, 32), captions, and labels as tensors of shape (N,)."""
    scenes = scenes if scenes is not None else [None] * len(seeds)
    examples = [render_example(seed, scene) for seed, scene in zip(seeds, scenes)]
    images = torch.stack([image for image, _, _ in examples])
    captions = [caption for _, caption, _ in examples]
    labels = {key: torch.tensor([example[2][key] for example in examples]) for key in examples[0][2]}
    return images, captions, labels
