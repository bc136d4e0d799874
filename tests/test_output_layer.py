"""The output layer in fp32 for every role: scoring, the student update and the frozen roles'
logits of the full-vocabulary estimators.

References are independent of the code under test: the model's own final hidden states (bf16 in
a bf16 model) and its bf16 output weight, multiplied in float64 (every bf16 x bf16 product is
exact in fp32 and float64; only the summation order differs), then ``log_softmax`` over the real
vocabulary in float64. fp32 accumulation of 32-term dot products of values of order 1 is good to
~1e-6; a bf16-rounded logit of order 10 is off by up to 0.03, so the 1e-5 tolerance separates the
two by three orders of magnitude.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.gopd import GOPDLossConfig
from megatron_gopd.models.arch import ModelArch
from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.testing import run_distributed
from megatron_gopd.types import RolloutBatch

B, SEQ, V_REAL = 4, 16, 50
TOL = 1e-5
ARCH = ModelArch(
    family="llama",
    hf_architecture="LlamaForCausalLM",
    vocab_size=V_REAL,
    padded_vocab_size=64,
    hidden_size=32,
    ffn_hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=8,
    norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=32,
    tie_word_embeddings=False,
    qkv_bias=False,
    qk_norm=False,
)


def _tokens(seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V_REAL, (B, SEQ), generator=g)


def _model(dtype):
    """A tiny GPTModel whose logits are of order 10 (bf16 rounds them by up to 0.03)."""
    from megatron_gopd.models import build_gpt

    model = build_gpt(ARCH, params_dtype=dtype, seed=11, spec="local")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "output_layer" in name:
                # each rank's slice of one global matrix
                from megatron.core import parallel_state as ps

                full = torch.randn(ARCH.padded_vocab_size, ARCH.hidden_size, generator=g) * 1.5
                tp, r = (
                    ps.get_tensor_model_parallel_world_size(),
                    ps.get_tensor_model_parallel_rank(),
                )
                p.copy_(full.chunk(tp, 0)[r])
    return model


def _final_hidden(model, tokens):
    from megatron_gopd.models.build import final_hidden_states

    pos = torch.arange(SEQ).unsqueeze(0).expand_as(tokens)
    with torch.no_grad(), final_hidden_states(model):
        return model(tokens, pos, None)  # [S, B, H]


def _reference_logprobs(model, tokens, temperature=1.0):
    """float64 log-probs of the next tokens from the model's final hidden states and its full
    (gathered) output weight, as they are (bf16 in a bf16 model)."""
    import torch.distributed as dist

    from megatron_gopd.models.build import unwrap_model

    h = _final_hidden(model, tokens).transpose(0, 1).double()  # [B, S, H]
    w = unwrap_model(model).output_layer.weight.detach()
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(w) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, w.contiguous())
        w = torch.cat(parts, 0)
    z = (h @ w.double().t())[..., :V_REAL] / temperature
    labels = torch.roll(tokens, -1, 1)
    return F.log_softmax(z, -1).gather(-1, labels[..., None])[..., 0]  # [B, S]


# ---------------------------------------------------------------------------------- scoring


def _scoring_error(dtype):
    from megatron.core import parallel_state as ps

    from megatron_gopd.scoring import hidden_to_logprobs

    model = _model(dtype)
    tokens = _tokens()
    ref = _reference_logprobs(model, tokens)
    hidden = _final_hidden(model, tokens)
    with torch.no_grad():
        lp = hidden_to_logprobs(model, hidden, torch.roll(tokens, -1, 1), vocab_size=V_REAL)
    assert ps.get_tensor_model_parallel_world_size() >= 1
    return (lp.double() - ref).abs().max().item()


@pytest.mark.parametrize("tp", [1, 2])
def test_scoring_logits_are_fp32_in_a_bf16_model(tp):
    """gopd-score / teacher / reference scoring of a bf16 model: its log-probs are those of fp32
    logits made from its bf16 hidden states and weight (bf16 logits are off by ~0.01)."""
    err = run_distributed(_scoring_error, tp, torch.bfloat16, parallel=ParallelConfig(tp, 1))
    assert max(err) < TOL, err


# ---------------------------------------------------------------------------------- the update


def _batch(tokens, rollout_BS):
    mask = torch.zeros(B, SEQ)
    for b, (a, e) in enumerate([(2, 15), (5, 11), (1, 15), (9, 13)]):
        mask[b, a:e] = 1.0
    return RolloutBatch(
        tokens_BS=tokens,
        response_mask_BS=mask,
        teacher_logprobs_BS=rollout_BS - 0.3,
        ref_logprobs_BS=None,
        rollout_logprobs_BS=rollout_BS,
        lam_B=torch.ones(B),
        domain_ids_B=torch.zeros(B, dtype=torch.long),
        domains=["d"],
        seq_lens_B=torch.full((B,), SEQ),
    )


def _update_mismatch(dtype, step_kwargs):
    """One train_step whose batch carries, as rollout log-probs, the float64 reference of the same
    weights: the update's own log-probs must reproduce them (the report's mean |difference|)."""
    from megatron_gopd.gopd import finalize_report
    from megatron_gopd.trainer.tracking import sum_reports
    from megatron_gopd.trainer.update import build_optimizer, train_step

    model = _model(dtype)
    tokens = _tokens()
    T = step_kwargs.get("temperature", 1.0)
    ref = _reference_logprobs(model, tokens, T).float()
    opt = build_optimizer(
        model,
        dataclasses.replace(_optim_cfg()),
        train_iters=1,
        bf16=dtype == torch.bfloat16,
    )
    reports, _ = train_step(
        opt,
        _batch(tokens, ref),
        micro_batch_size=2,
        loss_cfg=GOPDLossConfig(),
        vocab_size=V_REAL,
        **step_kwargs,
    )
    return finalize_report(sum_reports(reports))["rollout_abs_log_ratio"]


def _optim_cfg():
    from megatron_gopd.trainer.update import OptimConfig

    return OptimConfig(lr=1e-3)


@pytest.mark.parametrize("tp", [1, 2])
def test_update_logits_are_fp32_in_a_bf16_model(tp):
    """The student update's log-probs in a bf16 model come from fp32 logits, like scoring's."""
    out = run_distributed(_update_mismatch, tp, torch.bfloat16, {}, parallel=ParallelConfig(tp, 1))
    assert max(out) < TOL, out


# ---------------------------------------------------------------------------------- rollout engine


@pytest.fixture(scope="module")
def bf16_hf(tmp_path_factory):
    """A tiny bf16 HF Qwen3 whose logits are of order 10."""
    from megatron_gopd.testing import make_tiny_hf_model

    path = tmp_path_factory.mktemp("bf16") / "hf"
    model = make_tiny_hf_model(path, "qwen3", seed=4, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.to(torch.bfloat16).save_pretrained(str(path))
    from transformers import AutoModelForCausalLM

    # loaded as the engine loads it (bf16 weights, fp32 rotary buffers, eager attention): the
    # same final hidden states, bit for bit
    ref = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16, attn_implementation="eager"
    )
    return path, ref.eval()


def _engine_logprobs(path, **kw):
    """Prompt log-probs and the first sampled token's (at T = 0.7) from one prefill."""
    from megatron_gopd.cpu_server.engine import CpuEngine, GenItem

    engine = CpuEngine(str(path), dtype="bfloat16", **kw)
    items = [
        GenItem(
            rid=f"r{i}",
            input_ids=[(3 + 5 * i + 7 * j) % 250 for j in range(12)],
            params={"max_new_tokens": 1, "sampling_seed": 100 + i, "temperature": 0.7},
            return_logprob=True,
            logprob_start_len=0,
        )
        for i in range(3)
    ]
    engine.generate(items)
    return [
        (it.input_ids + it.output_ids, [*it.input_logprobs[1:], *it.output_logprobs])
        for it in items
    ]


def _hf_fp32_head_reference(model, ids):
    """float64 log-probs of ``ids[1:]`` from the HF model's bf16 final hidden states and bf16 LM
    head weight: untempered for the prompt, at 0.7 for the sampled last token."""
    x = torch.tensor([ids])
    with torch.no_grad():
        h = model.model(input_ids=x[:, :-1]).last_hidden_state[0].double()
    z = h @ model.lm_head.weight.double().t()
    z[-1] /= 0.7
    return F.log_softmax(z, -1).gather(1, x[0, 1:, None])[:, 0]


def test_cpu_server_fp32_lm_head(bf16_hf):
    """The CPU stand-in's --enable-fp32-lm-head (SGLang's flag): a bf16 model's log-probs are
    those of fp32 logits from its bf16 hidden states and LM head (prompt log-probs, and the
    tempered log-prob of a sampled token); without it they are bf16-rounded (the control)."""
    path, model = bf16_hf
    errs = []
    for fp32_head in (True, False):
        for ids, lps in _engine_logprobs(path, enable_fp32_lm_head=fp32_head):
            ref = _hf_fp32_head_reference(model, ids)
            errs.append((fp32_head, (torch.tensor(lps).double() - ref).abs().max().item()))
    assert max(e for f, e in errs if f) < TOL, errs
    assert min(e for f, e in errs if not f) > 100 * TOL, errs


# ---------------------------------------------------------------------------------- the GEMM's path


def _output_layer_vs_float64(device, dtype):
    """output_layer_logprobs on ``device`` in ``dtype`` (TP 1, several chunks, T = 0.7): values and
    the gradients of the hidden states and the weight against float64 autograd of the formula."""
    from megatron_gopd.vocab_parallel.output_layer import (
        OutputLayer,
        Weight,
        output_layer_logprobs,
    )

    g = torch.Generator().manual_seed(3)
    h = (torch.randn(40, 32, generator=g)).to(dtype)
    w = (torch.randn(64, 32, generator=g) * 0.8).to(dtype)
    tg = torch.randint(0, V_REAL, (40,), generator=g)
    up = torch.randn(40, generator=g)
    hh, ww = (x.to(device).clone().requires_grad_(True) for x in (h, w))
    lp, _ = output_layer_logprobs(
        OutputLayer(hh, ww, V_REAL, 0.7), tg.to(device), chunk_rows=16, with_entropy=True
    )
    (lp * up.to(device)).sum().backward()
    h64, w64 = (x.detach().double().requires_grad_(True) for x in (h, w))
    ref = F.log_softmax((h64 @ w64.t())[:, :V_REAL] / 0.7, -1).gather(1, tg[:, None])[:, 0]
    (ref * up.double()).sum().backward()
    return dict(
        mixed=Weight(ww).mixed,
        value=(lp.detach().cpu().double() - ref.detach()).abs().max().item(),
        grad_h=((hh.grad.cpu().double() - h64.grad).abs().max() / h64.grad.abs().max()).item(),
        grad_w=((ww.grad.cpu().double() - w64.grad).abs().max() / w64.grad.abs().max()).item(),
    )


def test_output_layer_on_the_host():
    """The host's path (an fp32 copy of the weight per pass), bf16 and fp32: values to 1e-5, the
    gradients to fp32 precision (bf16 parameters: their gradient is returned rounded to bf16)."""
    for dtype, grad_tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        r = _output_layer_vs_float64("cpu", dtype)
        assert not r["mixed"]
        assert r["value"] < TOL and r["grad_h"] < grad_tol and r["grad_w"] < grad_tol, r


@pytest.mark.gpu
def test_output_layer_on_cuda():
    """GPU twin of the test above: bf16 operands with fp32 accumulation and output
    (``torch.mm(out_dtype=float32)``, no weight copy) where torch has it; the logits' gradient
    enters the bf16 GEMMs of the backward rounded to bf16, as in megatron-core's own backward."""
    r = _output_layer_vs_float64("cuda", torch.bfloat16)
    assert r["value"] < TOL, r
    assert r["grad_h"] < 2e-2 and r["grad_w"] < 2e-2, r
    fp32 = _output_layer_vs_float64("cuda", torch.float32)
    assert not fp32["mixed"] and fp32["value"] < TOL and fp32["grad_h"] < 1e-4, fp32
