"""JPEG (in)compressibility, DDPO's model-free rewards: the size of the image saved as a JPEG."""

import io

import torch
from PIL import Image


def jpeg_sizes_kb(images: torch.Tensor, quality: int = 95) -> list[float]:
    """Size in kB (1000 bytes) of each image, quantised to uint8 and saved by PIL as a JPEG of `quality`."""
    pixels = (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return sizes


class JPEGCompressibilityReward:
    """Minus the JPEG size in kB at quality 95 (DDPO's `jpeg_compressibility`): rewards simple, smooth images.

    Scale: minus kB; at 512 x 512 px, -5 for a flat grey image, about -300 for uniform noise. The prompt is not
    used.

    Example:
        >>> import torch
        >>> flat, noisy = torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64)
        >>> flat_reward, noisy_reward = JPEGCompressibilityReward()(images=torch.stack([flat, noisy]))
        >>> flat_reward > noisy_reward
        True
    """

    def __init__(self, quality: int = 95, name: str = "jpeg_compressibility"):
        self.quality = quality
        self.__name__ = name

    def __call__(self, images: torch.Tensor, **kwargs) -> list[float]:
        return [-size for size in jpeg_sizes_kb(images, self.quality)]


class JPEGIncompressibilityReward:
    """The JPEG size in kB at quality 95 (DDPO's `jpeg_incompressibility`): rewards detailed, busy images.

    Scale: kB; at 512 x 512 px, 5 for a flat grey image, about 300 for uniform noise. The prompt is not used.
    """

    def __init__(self, quality: int = 95, name: str = "jpeg_incompressibility"):
        self.quality = quality
        self.__name__ = name

    def __call__(self, images: torch.Tensor, **kwargs) -> list[float]:
        return jpeg_sizes_kb(images, self.quality)
