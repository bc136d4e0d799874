"""Test set-up shared by every test module.

Multi-rank tests fork their ranks from this process (``megatron_gopd.testing.run_distributed``):
the ~9 s megatron import is paid once here, and ``torch.set_num_threads(1)`` must run before any
tensor op so that forked children do not inherit a dead OpenMP pool.
"""

import os
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*apex.*")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import megatron.core  # noqa: E402, F401  (pay the import once; forked ranks inherit it)
from megatron.core.models.gpt import GPTModel  # noqa: E402, F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
