"""An independent judge of the shapes world: an analytic scene parser that shares nothing learned with the reward.

In the spirit of GenEval's detector-based scoring, it finds the objects in an image by colour segmentation, names
each one's shape from its geometry and places it by its centroid, then checks the prompt's kind of claim: one
object at a position, two objects in a relation, a count, or three objects in a row. It has no weights: the palette,
shapes and anchors are the world's definition in `render.py`. Use it to check gains measured by the learned
`ShapesAlignmentReward`: a reward can be fooled, this parser is only as good as its geometry, and the two fail
differently.

Example:
    >>> from trl_noise_ppo.shapes.judge import ShapesJudge
    >>> from trl_noise_ppo.shapes.render import render_batch
    >>> images, captions, _ = render_batch(range(4))
    >>> ShapesJudge()(images=images, prompts=captions)
    [1.0, 1.0, 1.0, 1.0]
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .render import _CENTRES, COLOURS, IMAGE_SIZE, POSITION_NAMES, Scene, parse_caption


_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64) / 255.0
_COLOUR_NAMES = tuple(COLOURS)
_COVERAGE = 0.5  # a pixel is part of an object when at least half of it is covered (anti-aliased edges)
_MAX_RESIDUAL = 0.25  # RGB distance from the best palette mix above which a pixel is nobody's colour
_MIN_AREA = 4.0
_HALO = 2  # pixels around an object's core whose partial coverage still counts: blur spreads edges this far  # pixels: smaller specks are noise, not objects (the smallest rendered object covers about 25)
# Half of what an ideal upward triangle and an ideal square give (see `_shape_of`).
_TRIANGLE_SKEW, _SQUARE_KURTOSIS_GAP = -0.008, 0.002
_MIN_SEPARATION = 5.0  # pixels between centroids along a stated relation
_ROW_SPREAD = 6.0  # pixels: how far from the row's height an object of a row may be


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    x: float  # centroid, pixels from the left
    y: float  # centroid, pixels from the top
    area: float  # covered pixels


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask, each as an array of flat pixel indices."""
    height, width = mask.shape
    seen, components = np.zeros_like(mask), []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start], stack, members = True, [start], []
        while stack:
            y, x = stack.pop()
            members.append(y * width + x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        components.append(np.array(members))
    return components


def _cumulants(weights: np.ndarray, coordinate: np.ndarray) -> tuple[float, float]:
    """The third and fourth cumulants of `coordinate` under the mass `weights`."""
    centred = coordinate - (weights * coordinate).sum() / weights.sum()
    m2, m3, m4 = ((weights * centred**order).sum() / weights.sum() for order in (2, 3, 4))
    return m3, m4 - 3 * m2**2


def _shape_of(weights: np.ndarray) -> str:
    """Names the shape from its coverage map (H, W) by cumulants, which a Gaussian blur leaves unchanged (it adds
    only to the variance): an upward triangle's rows are skewed (third cumulant of y about -0.016 A^1.5, a circle's
    and a square's 0); a square's mass is flatter along its sides than along its diagonals (fourth cumulants differ
    by A^2 / 240), a circle's the same in every direction."""
    area = weights.sum()
    ys, xs = np.indices(weights.shape).astype(np.float64)
    if _cumulants(weights, ys)[0] / area**1.5 <= _TRIANGLE_SKEW:
        return "triangle"
    axes = [_cumulants(weights, c)[1] for c in (xs, ys)]
    diagonals = [_cumulants(weights, c / np.sqrt(2))[1] for c in (xs + ys, xs - ys)]
    return "square" if (np.mean(diagonals) - np.mean(axes)) / area**2 >= _SQUARE_KURTOSIS_GAP else "circle"


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    grown = mask.copy()
    for _ in range(pixels):
        step = grown.copy()
        step[1:] |= grown[:-1]
        step[:-1] |= grown[1:]
        step[:, 1:] |= grown[:, :-1]
        step[:, :-1] |= grown[:, 1:]
        grown = step
    return grown


def detect_objects(image: torch.Tensor) -> list[DetectedObject]:
    """The objects in one image (3, H, W) in [0, 1], from left to right.

    Each pixel is explained as the background mixed with one palette colour, p = bg + a (c - bg): the colour with the
    smallest residual names the pixel, and a is how much of the pixel it covers. Connected pixels of one colour,
    covered at least half, form an object.
    """
    if image.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        image = F.interpolate(image[None].float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)[0]
    pixels = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy().astype(np.float64)  # (H, W, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    directions = _PALETTE - background  # (colours, 3)
    offsets = pixels[:, :, None, :] - background  # (H, W, 1, 3)
    coverage = np.clip((offsets * directions).sum(-1) / (directions**2).sum(-1), 0, 1)  # (H, W, colours)
    residual = np.linalg.norm(offsets - coverage[..., None] * directions, axis=-1)
    best = residual.argmin(-1)
    best_coverage = np.take_along_axis(coverage, best[..., None], -1)[..., 0]
    best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    covered = (best_coverage >= _COVERAGE) & (best_residual <= _MAX_RESIDUAL)

    objects = []
    for colour_index, colour in enumerate(_COLOUR_NAMES):
        ours = best == colour_index
        cores = []
        for members in _components(covered & ours):
            core = np.zeros(covered.shape, dtype=bool)
            core.flat[members] = True
            cores.append(core)
        grown = [_grow(core, _HALO) & ours for core in cores]
        # an edge pixel near two objects of the same colour belongs to neither
        claimed = np.sum(grown, axis=0) if grown else np.zeros(covered.shape)
        for core, region in zip(cores, grown):
            weights = np.where(core | (region & (claimed == 1)), coverage[..., colour_index], 0.0)
            area = weights.sum()
            if area < _MIN_AREA:
                continue
            ys, xs = np.indices(weights.shape)
            x, y = (xs * weights).sum() / area + 0.5, (ys * weights).sum() / area + 0.5
            objects.append(DetectedObject(colour, _shape_of(weights), float(x), float(y), float(area)))
    return sorted(objects, key=lambda obj: obj.x)


def _nearest_position(obj: DetectedObject) -> str:
    distances = [(obj.x - _CENTRES[name][0]) ** 2 + (obj.y - _CENTRES[name][1]) ** 2 for name in POSITION_NAMES]
    return POSITION_NAMES[int(np.argmin(distances))]


def _in_relation(first: DetectedObject, second: DetectedObject, relation: str) -> bool:
    along, across = (second.x - first.x, second.y - first.y) if relation == "left of" else (second.y - first.y, second.x - first.x)
    return along >= _MIN_SEPARATION and along > abs(across)


def scene_matches(objects: list[DetectedObject], scene: Scene) -> bool:
    """Whether the detected objects show the scene: exactly its objects, bound to their colours, where it says."""
    found = [(obj.colour, obj.shape) for obj in objects]
    if len(objects) != len(scene.objects):
        return False
    if scene.kind == "single":
        return found == list(scene.objects) and _nearest_position(objects[0]) == scene.layout
    if scene.kind == "count":
        return all(pair == scene.objects[0] for pair in found)
    if scene.kind == "row":
        mean_y = sum(obj.y for obj in objects) / len(objects)
        in_row = all(abs(obj.y - mean_y) <= _ROW_SPREAD for obj in objects)
        return in_row and found == list(scene.objects) and all(_in_relation(a, b, "left of") for a, b in zip(objects, objects[1:]))
    # a pair: whichever object comes first along the relation must be the caption's first
    key = (lambda obj: obj.x) if scene.layout == "left of" else (lambda obj: obj.y)
    first, second = sorted(objects, key=key)
    return [(first.colour, first.shape), (second.colour, second.shape)] == list(scene.objects) and _in_relation(
        first, second, scene.layout
    )


class ShapesJudge:
    """Judge function with the reward convention: 1.0 where the parsed image shows its prompt, else 0.0.

    Called as `judge(images=(N, 3, H, W) floats in [0, 1], prompts=N captions, **columns)`; usable wherever a
    reward function is (`trl-noise-ppo evaluate --judge_funcs shapes_judge`), but meant for evaluation only.
    """

    name = "shapes_judge"
    __name__ = name

    def __call__(self, images: torch.Tensor, prompts: list[str], **kwargs) -> list[float]:
        return [float(scene_matches(detect_objects(image), parse_caption(prompt))) for image, prompt in zip(images, prompts)]
