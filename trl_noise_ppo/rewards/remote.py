"""A client for a reward served by another process (another GPU, another machine, another environment)."""

import base64
import io
import json
import time
import urllib.error
import urllib.request

import torch
from PIL import Image


def png_base64(image: torch.Tensor) -> str:
    """A (3, H, W) float image in [0, 1] as a base64-encoded 8-bit PNG."""
    pixels = (image * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class HTTPReward:
    """Scores images by POSTing them, `batch_size` at a time, to a reward server.

    The protocol is plain JSON:

    - request: `{"prompts": [str, ...], "images": [base64 PNG, ...]}`, one prompt per image;
    - response: `{"rewards": [float | null, ...]}`, one per image, null for an image it cannot score.

    A request that fails (connection error, timeout, HTTP 5xx) is retried `retries` times, waiting
    `backoff * 2**attempt` seconds before each retry; an HTTP 4xx, a malformed response or the last failure
    raises a `RuntimeError` that names the URL and the cause.

    Args:
        url: the server's scoring endpoint, e.g. "http://127.0.0.1:8000/score".
        name: the logging name, `rewards/<name>/mean`.
        batch_size: images per request.
        timeout: seconds to wait for each request's answer.
        retries: retries of a failed request.
        backoff: seconds before the first retry; doubled for each further retry.
    """

    def __init__(
        self,
        url: str,
        name: str = "http",
        batch_size: int = 16,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
    ):
        self.url = url
        self.__name__ = name
        self.batch_size = batch_size
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    def __call__(self, images: torch.Tensor, prompts: list[str], **kwargs) -> list[float | None]:
        rewards = []
        for start in range(0, len(prompts), self.batch_size):
            batch_prompts = list(prompts[start : start + self.batch_size])
            batch_images = [png_base64(image) for image in images[start : start + self.batch_size]]
            rewards += self._post({"prompts": batch_prompts, "images": batch_images}, expected=len(batch_prompts))
        return rewards

    def _post(self, payload: dict, expected: int) -> list[float | None]:
        body = json.dumps(payload).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw_answer = response.read()
                break
            except urllib.error.HTTPError as error:
                if error.code < 500:  # the request itself is wrong: retrying cannot help
                    raise RuntimeError(f"{self.__name__}: {self.url} refused the request: {error}") from error
                last_error = error
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                last_error = error
        else:
            raise RuntimeError(
                f"{self.__name__}: {self.retries + 1} requests to {self.url} failed; the last with {last_error!r}. "
                f"Check that the reward server is running and reachable, or raise `timeout` or `retries`."
            ) from last_error
        try:
            rewards = json.loads(raw_answer)["rewards"]
        except (ValueError, TypeError, KeyError):
            rewards = None
        if not isinstance(rewards, list) or len(rewards) != expected:
            raise RuntimeError(
                f"{self.__name__}: {self.url} answered {raw_answer[:200]!r}; expected "
                f'{{"rewards": [...]}} with {expected} values, one per image.'
            )
        return rewards
