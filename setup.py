import re
from pathlib import Path

from setuptools import find_packages, setup


here = Path(__file__).parent
version = re.search(r'__version__ = "(.+?)"', (here / "trl_noise_ppo" / "__init__.py").read_text()).group(1)

setup(
    name="trl-noise-ppo",
    version=version,
    description="Noise PPO for TRL: fine-tune any text-to-image diffusion pipeline by learning its initial noise with PPO.",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["trl_noise_ppo", "trl_noise_ppo.*"]),
    package_data={
        "trl_noise_ppo": [
            "templates/*.md",
            "shapes/weights/*/*.json",
            "shapes/weights/*/*.txt",
            "shapes/weights/*/*.safetensors",
            "shapes/weights/*/*/*.json",
            "shapes/weights/*/*/*.txt",
            "shapes/weights/*/*/*.safetensors",
        ]
    },
    # Upper bounds where the package relies on private code (tests/test_private_api.py names each symbol): diffusers'
    # pipeline internals and transformers' Trainer methods, up to the newest minor versions tested.
    install_requires=[
        "torch>=2.6",
        "trl>=1.16,<2",
        "diffusers>=0.42,<0.43",
        "transformers>=5.24,<5.26",
        "accelerate>=1.10.1",
        "datasets>=4.7",
        "peft>=0.17",
        "huggingface_hub>=2.4,<3",
        "safetensors>=0.8",
        "numpy>=1.26",
        "pandas>=2.1",
        "Pillow",
        "pyyaml>=6.0.1",
        "tqdm",
    ],
    extras_require={
        "hps": ["ftfy"],  # the HPSv2 reward's prompt cleaning, as open_clip's
        "examples": ["matplotlib"],  # examples/quickstart.py's reward curve, and the benchmarks' plots
        "test": ["pytest", "ftfy", "sentencepiece", "matplotlib"],  # matplotlib: the quickstart runs in tests/test_examples.py
        "docs": ["mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings-python==2.0.11"],
    },
    entry_points={"console_scripts": ["trl-noise-ppo = trl_noise_ppo.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
