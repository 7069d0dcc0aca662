import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).parent.parent


def test_docs_build_strictly(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]' to build and test the docs")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    # mkdocstrings found and rendered the documented objects, with their parameters
    for name in ("NoisePPOConfig", "NoisePPOTrainer", "NoiseGeneratorConfig", "NoiseGenerator", "NoisePPOPipeline",
                 "rewards.PickScoreReward", "rewards.call_reward_funcs", "image_logging.log_images"):
        assert f'id="trl_noise_ppo.{name}"' in api, name
    assert "num_generations" in api and "sample_batch_size" in api


def test_the_command_line_page_lists_every_built_in_reward():
    from trl_noise_ppo.rewards import REWARDS

    cli = (REPO / "docs" / "cli.md").read_text()
    rewards_bullet = cli.split("- **the rewards**", 1)[1].split("\n- **", 1)[0]
    assert [name for name in REWARDS if f"`{name}`" not in rewards_bullet] == []
