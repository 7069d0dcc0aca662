"""A procedural world of coloured shapes: scenes, captions, 32 x 32 images and the train / held-out split.

A scene is one object at a position ("a red circle on the left") or two objects in a relation ("a green
triangle left of a yellow circle"). Every scene has exactly one caption, and the caption can be parsed back
into the scene, so a reward can read the prompt.

Example:
    >>> from trl_noise_ppo.shapes.render import render_example
    >>> image, caption, labels = render_example(seed=0)
    >>> image.shape
    torch.Size([3, 32, 32])
"""

import itertools
from dataclasses import dataclass

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
# Two objects: the first is left of / above the second.
RELATIONS = ("left of", "above")
# The classifier's layout classes: where the one object is, or how the two objects are arranged.
LAYOUTS = POSITION_NAMES + RELATIONS

# Object centres in pixels (x, y) for each layout; a pair lists its first object first.
_CENTRES = {
    "left": [(8, 16)],
    "right": [(24, 16)],
    "top": [(16, 8)],
    "bottom": [(16, 24)],
    "center": [(16, 16)],
    "left of": [(8, 16), (24, 16)],
    "above": [(16, 8), (16, 24)],
}
_JITTER = 2.0  # pixels, uniform, per axis
_RADIUS = (4.5, 6.5)  # pixels, uniform
_COLOUR_JITTER = 20  # per channel, uniform
_BACKGROUND = (25, 25, 30)
_BACKGROUND_JITTER = 10

# Share of one-object scenes when sampling from all scenes (there are far more two-object scenes).
SINGLE_OBJECT_SHARE = 0.5
# A scene is held out of Noise PPO training when the sum of its attribute indices is divisible by this.
HELD_OUT_MODULUS = 5


@dataclass(frozen=True)
class Scene:
    """One or two (colour, shape) objects and their layout, a member of `LAYOUTS`."""

    objects: tuple[tuple[str, str], ...]
    layout: str

    @property
    def caption(self) -> str:
        (colour, shape), *rest = self.objects
        if not rest:
            return f"a {colour} {shape} {POSITIONS[self.layout]}"
        (colour_b, shape_b) = rest[0]
        return f"a {colour} {shape} {self.layout} a {colour_b} {shape_b}"

    @property
    def labels(self) -> dict[str, int]:
        """Class indices for the classifier's heads; -1 where an attribute does not exist (no second object)."""
        (colour, shape), *rest = self.objects
        colour_b, shape_b = rest[0] if rest else (None, None)
        return {
            "layout": LAYOUTS.index(self.layout),
            "colour_a": COLOUR_NAMES.index(colour),
            "shape_a": SHAPES.index(shape),
            "colour_b": COLOUR_NAMES.index(colour_b) if colour_b else -1,
            "shape_b": SHAPES.index(shape_b) if shape_b else -1,
        }

    @property
    def is_held_out(self) -> bool:
        # A fixed Latin-square-like rule: every colour, shape and layout still appears in training, and each
        # (colour, shape) object is held out at exactly one of the five single-object positions.
        return sum(index for index in self.labels.values() if index >= 0) % HELD_OUT_MODULUS == 0


def single_object_scenes() -> list[Scene]:
    """All 90 colour x shape x position scenes, in a fixed order."""
    return [
        Scene(((colour, shape),), position)
        for colour, shape, position in itertools.product(COLOUR_NAMES, SHAPES, POSITION_NAMES)
    ]


def two_object_scenes() -> list[Scene]:
    """All 612 scenes of two different objects in a relation, in a fixed order."""
    objects = list(itertools.product(COLOUR_NAMES, SHAPES))
    return [
        Scene((first, second), relation)
        for relation, first, second in itertools.product(RELATIONS, objects, objects)
        if first != second
    ]


def all_scenes() -> list[Scene]:
    return single_object_scenes() + two_object_scenes()


def training_prompts(include_two_objects: bool = True) -> list[str]:
    """Captions Noise PPO may train on (the base model saw every scene, held-out ones included)."""
    scenes = all_scenes() if include_two_objects else single_object_scenes()
    return [scene.caption for scene in scenes if not scene.is_held_out]


def held_out_prompts(include_two_objects: bool = True) -> list[str]:
    """Captions never used to train Noise PPO, for measuring whether a noise generator generalises."""
    scenes = all_scenes() if include_two_objects else single_object_scenes()
    return [scene.caption for scene in scenes if scene.is_held_out]


_SCENES_BY_CAPTION = {scene.caption: scene for scene in all_scenes()}


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; raises ValueError for a caption outside this world."""
    scene = _SCENES_BY_CAPTION.get(" ".join(caption.lower().split()))
    if scene is None:
        raise ValueError(f"{caption!r} is not a caption of the shapes world, e.g. {all_scenes()[0].caption!r}.")
    return scene


def sample_scene(rng: np.random.Generator) -> Scene:
    """A scene drawn with one-object and two-object scenes equally likely, uniform within each."""
    scenes = single_object_scenes() if rng.random() < SINGLE_OBJECT_SHARE else two_object_scenes()
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


def render_scene(scene: Scene, seed: int) -> torch.Tensor:
    """The scene as a float tensor of shape (3, 32, 32) in [0, 1]; the seed fixes positions, sizes and tints."""
    rng = np.random.default_rng(seed)
    background_tint = np.array(_BACKGROUND) + rng.integers(-_BACKGROUND_JITTER, _BACKGROUND_JITTER + 1, 3)
    background = tuple(int(c) for c in np.clip(background_tint, 0, 255))
    size = IMAGE_SIZE * _SUPERSAMPLE
    canvas = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(canvas)
    for (colour, shape), centre in zip(scene.objects, _CENTRES[scene.layout]):
        jittered_centre = tuple(c + rng.uniform(-_JITTER, _JITTER) for c in centre)
        radius = rng.uniform(*_RADIUS)
        tint = np.array(COLOURS[colour]) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
        _draw_object(draw, shape, jittered_centre, radius, tuple(int(c) for c in np.clip(tint, 0, 255)))
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
