"""The reward models' image preprocessing, applied to the trainer's float tensors.

The reference implementations take PIL images: the generated image is quantised to uint8, resized with PIL's
bicubic filter, cropped or padded, then normalised. These functions reproduce those recipes on (N, 3, H, W)
float tensors in [0, 1], on the tensors' own device, with no PIL round trip.
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
    images: torch.Tensor, shortest_side: int, crop_height: int, crop_width: int
) -> torch.Tensor:
    """CLIP's and BLIP's recipe: scale the shorter side to `shortest_side`, then crop the centre.

    The longer side becomes `int(shortest_side * long / short)`, as in transformers' `CLIPImageProcessor` and
    torchvision's `Resize(int)`. The crop offset is `(size - crop) // 2`, as in `CLIPImageProcessor`; torchvision's
    `CenterCrop` (ImageReward) rounds half an odd excess instead, a one-pixel shift that square images never hit.
    """
    height, width = images.shape[-2:]
    long_side = int(shortest_side * max(height, width) / min(height, width))
    new_height, new_width = (shortest_side, long_side) if height <= width else (long_side, shortest_side)
    images = pil_bicubic_resize(images, new_height, new_width)
    top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
    return images[..., top : top + crop_height, left : left + crop_width]


def resize_longest_side_and_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """HPSv2's recipe (open_clip's `ResizeMaxSize`): scale the longer side to `size`, pad with black to a square.

    The shorter side becomes `round(short * size / long)`; the padding is centred, its odd pixel going to the right
    or bottom.
    """
    height, width = images.shape[-2:]
    scale = size / max(height, width)
    new_height, new_width = round(height * scale), round(width * scale)
    images = pil_bicubic_resize(images, new_height, new_width)
    pad_height, pad_width = size - new_height, size - new_width
    padding = (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
    return F.pad(images, padding, value=0.0)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Per-channel `(images - mean) / std`."""
    mean_tensor = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_tensor = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_tensor) / std_tensor
