"""A local stand-in for the Hugging Face Hub, for `benchmarks.kill_loop`: `HfApi.create_repo` and `HfApi.upload_folder`
write into the folder `$FAKE_HUB_DIR` instead of huggingface.co, slowly, so that an upload in the background
(`run_as_future=True`, as the Trainer pushes checkpoints) still reads the output folder while training goes on.

An upload that finds a file it listed gone (moved or deleted by the trainer) appends the error to
`$FAKE_HUB_DIR/errors.txt`. Installed in a process by `install()`, or, in the processes a command starts, by a
`sitecustomize.py` on `PYTHONPATH` that calls it (see the kill loop).
"""

import os
import time
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import HfApi
from huggingface_hub.hf_api import future_compatible
from huggingface_hub.utils import filter_repo_objects


# a slow connection: each file takes this long, so that training goes on while an upload reads the folder
SECONDS_PER_FILE = 0.05


def create_repo(self, repo_id: str, **kwargs) -> SimpleNamespace:
    return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"local/{repo_id}")


@future_compatible
def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, allow_patterns=None,
                  ignore_patterns=None, run_as_future=False, **kwargs) -> SimpleNamespace:
    hub, folder = Path(os.environ["FAKE_HUB_DIR"]), Path(folder_path)
    names = [path.relative_to(folder).as_posix() for path in sorted(folder.rglob("*")) if path.is_file()]
    try:
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            time.sleep(SECONDS_PER_FILE)
            target = hub / repo_id / (path_in_repo or "") / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((folder / name).read_bytes())
    except OSError as error:
        hub.mkdir(parents=True, exist_ok=True)
        with open(hub / "errors.txt", "a") as errors:
            errors.write(f"{commit_message}: {error!r}\n")
        raise
    return SimpleNamespace(commit_message=commit_message)


def install() -> None:
    HfApi.create_repo = create_repo
    HfApi.upload_folder = upload_folder


def uploaded(hub: Path) -> list[str]:
    """The paths of every file uploaded to the fake Hub `hub`, relative to it."""
    return [str(path.relative_to(hub)) for path in hub.rglob("*") if path.is_file() and path.name != "errors.txt"]
