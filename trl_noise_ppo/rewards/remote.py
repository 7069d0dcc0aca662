"""A client for a reward served by another process (another GPU, another machine, another environment)."""

import base64
import http.client
import io
import json
import math
import threading
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

    A request that fails (connection error, timeout, an answer cut short, HTTP 5xx) is retried `retries` times, waiting
    `backoff * 2**attempt` seconds before each retry; an HTTP 4xx, a malformed response or the last failure
    raises a `RuntimeError` that names the URL and the cause.

    The server does the work, so the trainer scores each chunk of images while the pipeline samples the next
    (`concurrent = True`; see `NoisePPOConfig.score_while_sampling`).

    Args:
        url: the server's scoring endpoint, e.g. "http://127.0.0.1:8000/score".
        name: the logging name, `rewards/<name>/mean`.
        batch_size: images per request.
        timeout: seconds one request may take, from connecting to the answer's last byte.
        retries: retries of a failed request.
        backoff: seconds before the first retry; doubled for each further retry.
    """

    concurrent = True

    def __init__(
        self,
        url: str,
        name: str = "http",
        batch_size: int = 16,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 1.0,
    ):
        whole = all(isinstance(value, int) and not isinstance(value, bool) for value in (batch_size, retries))
        # `not x > 0` and not `x <= 0`, so that NaN fails too; a wait beyond threading.TIMEOUT_MAX overflows
        if not (whole and batch_size >= 1 and retries >= 0 and 0 < timeout <= threading.TIMEOUT_MAX and 0 <= backoff < math.inf):
            raise ValueError(
                f"HTTPReward needs batch_size >= 1, retries >= 0, timeout > 0 and backoff >= 0, the first two whole numbers "
                f"and the last two finite (timeout at most {threading.TIMEOUT_MAX:.3g} s); got batch_size={batch_size!r}, "
                f"retries={retries!r}, timeout={timeout!r}, backoff={backoff!r}."
            )
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
                raw_answer = self._answer(request)
                break
            except urllib.error.HTTPError as error:
                if error.code < 500:  # the request itself is wrong: retrying cannot help
                    raise RuntimeError(f"{self.__name__}: {self.url} refused the request: {error}") from error
                last_error = error
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as error:
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

    def _answer(self, request: urllib.request.Request) -> bytes:
        """The whole answer to `request`, or `TimeoutError` when it has not come within `timeout` seconds. urllib's own
        timeout bounds each read of the socket only: an answer trickled a byte at a time would never time out."""
        outcome = {}

        def fetch():
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    outcome["answer"] = response.read()
            except Exception as error:  # raised again in the caller's thread
                outcome["error"] = error

        # a daemon thread, left behind on timeout: it ends with the connection, and never holds up the interpreter's exit
        worker = threading.Thread(target=fetch, name="http-reward", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise TimeoutError(f"no complete answer within {self.timeout} s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["answer"]
