"""Real SGLang on a GPU: the same parity and sync checks as the CPU tests.

Skipped without CUDA (conftest) or without the ``sglang`` package (``pip install -e .[gpu]``).
A tiny Llama (SGLang's Llama implements ``/get_weights_by_name``; its Qwen models do not) is saved,
converted, and served by ``python -m sglang.launch_server`` in fp32 with the torch-native
attention backend. Trainer ranks are *spawned* (CUDA cannot be used in forked children).

Checks: the client's rollout log-probs equal the HF model's; after a perturbation + push, SGLang's
prefill log-probs equal the trainer's Megatron log-probs; the sync check reads back exactly what
was sent. Transports: ``tensor`` (CUDA IPC, colocated on GPU 0) and ``disk`` always;
``distributed`` (NCCL) when a second GPU can hold the server, since NCCL refuses two ranks on one
device. GPU tolerance is 1e-3: SGLang's and Megatron's fp32 kernels differ (reduction order).
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

GPU_TOL = 1e-3


def _have_sglang() -> bool:
    import importlib.util

    return importlib.util.find_spec("sglang") is not None


@pytest.fixture(scope="module")
def sglang_setup(tmp_path_factory):
    if not torch.cuda.is_available() or not _have_sglang():
        pytest.skip("needs CUDA and SGLang")
    from test_weight_sync import _convert

    from megatron_gopd.rollout import RolloutServers, ServerLaunchConfig
    from megatron_gopd.testing import make_tiny_hf_model, run_distributed

    d = tmp_path_factory.mktemp("sglang")
    hf = make_tiny_hf_model(d / "hf", "llama", seed=6)
    run_distributed(_convert, 1, str(d / "hf"), str(d / "mcore"), start_method="spawn")
    two_gpus = torch.cuda.device_count() >= 2
    cfg = ServerLaunchConfig(
        backend="sglang",
        model_path=str(d / "hf"),
        base_gpu_id=1 if two_gpus else 0,
        dtype="float32",
        context_length=256,
        mem_fraction_static=0.3,
        deterministic=True,
        extra_args=("--attention-backend", "torch_native", "--disable-cuda-graph"),
        startup_timeout_s=600,
    )
    hf.config._attn_implementation = "eager"
    with RolloutServers(cfg) as servers:
        yield d, servers, hf.eval(), two_gpus


def test_sglang_rollout_logprobs_match_hf(sglang_setup):
    from megatron_gopd.rollout import ClientConfig, RolloutClient, RolloutPrompt, SamplingConfig

    _, servers, hf, _ = sglang_setup
    client = RolloutClient(servers.urls, ClientConfig(progress=False))
    prompts = [RolloutPrompt([1 + i, 5, 9, 13], prompt_index=i) for i in range(4)]
    samples = client.sample(prompts, n=2, sampling=SamplingConfig(max_new_tokens=8, seed=1))
    assert len(samples) == 8
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            logits = hf(input_ids=ids).logits[0].float()
        ref = F.log_softmax(logits[len(s.prompt_ids) - 1 : -1], -1)
        ref = ref.gather(1, torch.tensor(s.response_ids)[:, None]).squeeze(1)
        assert (torch.tensor(s.rollout_logprobs_T) - ref).abs().max().item() <= GPU_TOL
    again = client.sample(prompts, n=2, sampling=SamplingConfig(max_new_tokens=8, seed=1))
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]


@pytest.mark.parametrize("transport", ["tensor", "disk", "distributed"])
def test_sglang_parity_after_push(sglang_setup, transport):
    from test_weight_sync import _push_and_score

    from megatron_gopd.parallel import ParallelConfig
    from megatron_gopd.testing import run_distributed

    d, servers, _, two_gpus = sglang_setup
    if transport == "distributed" and not two_gpus:
        pytest.skip("NCCL needs the server on another GPU than the trainer")
    before, after, megatron, report = run_distributed(
        _push_and_score,
        1,
        str(d / "mcore"),
        servers.urls[0],
        transport,
        str(d / "disk"),
        7,
        parallel=ParallelConfig(1, 1),
        start_method="spawn",
    )[0]
    assert (after - megatron).abs().max().item() <= GPU_TOL
    assert (before - megatron).abs().max().item() > 100 * GPU_TOL
    assert max(report.check_max_diff.values()) == 0.0
