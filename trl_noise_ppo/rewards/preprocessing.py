"""The reward models' image preprocessing, applied to the trainer's float tensors.

The reference implementations take PIL images, so the generated image is first quantised to uint8. CLIP's and
BLIP's recipes then resize with PIL's bicubic filter (uint8 after each pass) and crop; HPS's converts to a float
tensor first and resizes that with torchvision (no rounding). These functions reproduce those recipes on
(N, 3, H, W) float tensors in [0, 1], on the tensors' own device, with no PIL round trip.
"""

import torch
import torch.nn.functional as F


def quantize_to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """Rounds to the 256 levels of a uint8 image, as converting a generated image to PIL does."""
    return (images * 255).round().clamp(0, 255) / 255


def pil_bicubic_resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resizes like `PIL.Image.resize((width, height), Image.BICUBIC)` on the uint8 version of `images`.

    PIL filters the width first, then the height, with an antialiased bicubic kernel (a = -0.5), and rounds to
    uint8 after each pass. torch's antialiased bicubic uses the same kernel, so the same two passes with the same
    rounding give PIL's pixels; PIL's fixed-point arithmetic rounds a few percent of them one or two levels
    differently.
    """
    images = quantize_to_uint8_levels(images)
    if images.shape[-1] != width:
        resized = F.interpolate(images, size=(images.shape[-2], width), mode="bicubic", antialias=True)
        images = quantize_to_uint8_levels(resized)
    if images.shape[-2] != height:
        resized = F.interpolate(images, size=(height, width), mode="bicubic", antialias=True)
        images = quantize_to_uint8_levels(resized)
    return images


def resize_shortest_side_and_center_crop(
    images: torch.Tensor, shortest_side: int, crop_height: int, crop_width: int, round_crop_offset: bool = False
) -> torch.Tensor:
    """CLIP's and BLIP's recipe: scale the shorter side to `shortest_side`, then crop the centre.

    The longer side becomes `int(shortest_side * long / short)`, as in transformers' `CLIPImageProcessor` and
    torchvision's `Resize(int)`. The crop offset is `(size - crop) // 2`, as in `CLIPImageProcessor`, or with
    `round_crop_offset` `int(round((size - crop) / 2))`, as in torchvision's `CenterCrop` (ImageReward): Python's
    rounding sends half an odd excess to the even side, so the two differ by a pixel at, e.g., 832 x 1216.
    """
    height, width = images.shape[-2:]
    long_side = int(shortest_side * max(height, width) / min(height, width))
    new_height, new_width = (shortest_side, long_side) if height <= width else (long_side, shortest_side)
    images = pil_bicubic_resize(images, new_height, new_width)
    if round_crop_offset:
        top, left = int(round((new_height - crop_height) / 2)), int(round((new_width - crop_width) / 2))
    else:
        top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
    return images[..., top : top + crop_height, left : left + crop_width]


def resize_longest_side_and_pad(images: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """HPSv2's recipe (`hpsv2`'s open_clip: `ToTensor`, then `ResizeMaxSize`): scale the longer side to `size`, pad
    with black to a square.

    The image is quantised to uint8 (the reference is given a PIL image), then resized as a float tensor by
    torchvision's `F.resize(..., BICUBIC)`: one `interpolate` call, no rounding, no clamp. `antialias` is that
    call's: torchvision antialiases tensors by default from 0.17 (2024) on, and did not up to 0.16, the setup the
    published HPSv2 numbers were computed with. The shorter side becomes `round(short * size / long)`; the
    padding is centred, its odd pixel going to the right or bottom.
    """
    images = quantize_to_uint8_levels(images)
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    if (new_height, new_width) != (height, width):
        images = F.interpolate(
            images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=antialias
        )
    pad_height, pad_width = size - new_height, size - new_width
    padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
    return F.pad(images, padding, value=0.0)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel `(images - mean) / std`."""
    mean_tensor = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_tensor = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_tensor) / std_tensor
