"""megatron_gopd: Generalized On-Policy Distillation (G-OPD, arXiv 2602.12125) on Megatron-Core.

Version ranges are deliberate:
- megatron-core 0.16.1 is the newest release that installs on Python 3.11 (our CI); GPU clusters
  run newer releases (NGC containers, Python 3.12, 0.19.x). The code paths we use are kept
  compatible across that range; the upper bound is the next release we have not read.
- torch: any release megatron-core supports; CI installs the 2.13.0 CPU wheel explicitly.
- transformers >= 4.51 is the first with Qwen3; 5.x changed config field names (rope_parameters),
  which our architecture parser reads in both spellings.
- sglang and transformer-engine are GPU-only and heavy: they live in the [gpu] extra, never in
  the base install. apex is optional and not on PyPI (see README).
- math-verify is in the base install: the trainer's periodic evaluation grades math answers with
  it (small, pure Python; the antlr4 4.13 runtime is the one its LaTeX parser is generated for).
  Plots (matplotlib) and parquet benchmark files (pyarrow) are the [eval] extra, imported lazily;
  [test] lists them too so that CI exercises them.
"""

from pathlib import Path

from setuptools import find_packages, setup

BASE = [
    "torch>=2.6",
    "megatron-core>=0.16.1,<0.20",
    "transformers>=4.51,<6",
    "safetensors>=0.4",
    "sentencepiece>=0.2",
    "numpy>=1.26",
    "psutil>=5.9",  # required by megatron-core's dist_checkpointing
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "tensorboard>=2.14",  # per-step metrics (torch.utils.tensorboard)
    "math-verify[antlr4_13_2]>=0.9,<1",
    # rollout client: asyncio HTTP with bounded concurrency (SGLang's own benchmarks use it);
    # 3.9 is the first with the timeout/connector API we use, 4.x is unreleased
    "aiohttp>=3.9,<4",
    "packaging>=20",  # SGLang version comparisons (also a dependency of transformers)
]

EVAL = [
    "matplotlib>=3.7",
    "pyarrow>=14",
]

EXTRAS = {
    "gpu": [
        "transformer-engine[pytorch]>=2.4",
        # The rollout protocol is pinned to SGLang 0.5.23's schema (megatron_gopd.rollout.protocol);
        # the fields we use are the same back to 0.5.4. What differs by version is handled by
        # version, read from each server (rollout.protocol.SGLangFeatures; bisected over the PyPI
        # wheels' srt/entrypoints/http_server.py, srt/managers/io_struct.py, srt/constants.py,
        # srt/utils/auth.py): load_format="flattened_bucket" on update_weights_from_distributed
        # first in 0.5.6 (0.5.5.post3 lacks it: older servers get one broadcast per tensor);
        # /weights_checker and /server_info 0.5.6; --admin-api-key 0.5.8; /ready* without a key
        # 0.5.20; /begin_weight_update + /end_weight_update required around tensor and
        # distributed updates from 0.5.21 (absent before); the cuda_graph memory tag 0.5.4.post3.
        # So 0.5.4 stays the floor; --weight-sync-check needs 0.5.6+ for Qwen models.
        "sglang>=0.5.4",
        "sglang-router>=0.2",
    ],
    "eval": EVAL,
    "test": [
        "pytest>=8.0",
        "pytest-timeout>=2.3",
        "wandb>=0.17",  # the offline-mode test of the W&B sink
        *EVAL,
    ],
    "wandb": ["wandb>=0.17"],
    "dev": [
        "ruff>=0.6",
    ],
}

setup(
    name="megatron_gopd",
    version="0.1.0.dev0",
    description="Generalized On-Policy Distillation (G-OPD / ExOPD) for Megatron-Core",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_gopd", "megatron_gopd.*"]),
    package_data={"megatron_gopd.evaluation": ["samples/*.jsonl"]},
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "gopd-score=megatron_gopd.scoring:main",
            "gopd-eval=megatron_gopd.evaluation.__main__:main",
            "gopd-train=megatron_gopd.train:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
    ],
)
