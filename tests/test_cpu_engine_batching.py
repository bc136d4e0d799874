"""The CPU stand-in batches every request in flight, as SGLang's scheduler does.

A rollout sends one entry per sample (its own rid, so that it can be aborted), so an engine that
batches only within a request (items with the same prompt) runs a 128-prompt rollout one prompt at
a time. These tests drive :class:`~megatron_gopd.cpu_server.engine.CpuEngine` in-process from many
threads and check, against independent references:

* the work: model forwards per decode step of the whole set, not per request;
* the numbers: reported log-probs equal ``log_softmax(logits / T)`` of a plain full-sequence
  forward of the HF model on the finished sequence (prompt log-probs untempered);
* determinism: with ``deterministic=True`` (SGLang's ``--enable-deterministic-inference``, whose
  point is batch invariance) a request gives bit-identical tokens and log-probs alone and in any
  company; without it, greedy results agree to fp32 rounding;
* joins and exits: requests arriving while others decode join between steps, finished and
  aborted rows leave without disturbing the rest.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from megatron_gopd.cpu_server.engine import CpuEngine, GenItem
from megatron_gopd.testing import make_tiny_hf_model

VOCAB_LO, VOCAB_HI = 3, 90


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("batching") / "hf"
    make_tiny_hf_model(d, "qwen3", seed=5)
    return d


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(2, 12, (n,), generator=g).tolist()
    return [torch.randint(VOCAB_LO, VOCAB_HI, (k,), generator=g).tolist() for k in lens]


def _item(rid: str, prompt: list[int], **sp) -> GenItem:
    params = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True, **sp}
    return GenItem(rid=rid, input_ids=list(prompt), params=params, return_logprob=True)


def _run_concurrently(engine: CpuEngine, requests: list[list[GenItem]], stagger_s: float = 0.0):
    """Each request from a thread of its own, as the HTTP server's handler threads call it."""
    errors: list[BaseException] = []
    together = threading.Barrier(len(requests)) if not stagger_s else None

    def one(items):
        try:
            if together is not None:
                together.wait(30)
            engine.register([it.rid for it in items])
            engine.generate(items)
        except BaseException as e:  # re-raised below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(r,)) for r in requests]
    for t in threads:
        t.start()
        if stagger_s:
            time.sleep(stagger_s)
    for t in threads:
        t.join(120)
    assert not errors, errors


class _CountForwards:
    """Counts the HF model's forward calls (one per scheduler step of the batch)."""

    def __init__(self, engine: CpuEngine):
        self.n = 0
        model = engine.model
        orig = model.forward

        def counted(*a, **k):
            self.n += 1
            return orig(*a, **k)

        model.forward = counted


def _reference_logprobs(hf_model, item: GenItem, temperature: float) -> list[float]:
    """``log_softmax(logits / T)`` of each response token from one full-sequence forward."""
    ids = torch.tensor([item.input_ids + item.output_ids])
    with torch.no_grad():
        logits = hf_model(input_ids=ids).logits[0].float()
    n = len(item.input_ids)
    lp = F.log_softmax(logits[n - 1 : -1] / temperature, dim=-1)
    return lp.gather(1, torch.tensor(item.output_ids)[:, None]).squeeze(1).tolist()


def test_requests_in_flight_run_as_one_batch(model_dir):
    """32 single-sample requests of 8 tokens: the old engine ran 32 x (1 + 8) forwards."""
    engine = CpuEngine(str(model_dir), random_seed=1)
    count = _CountForwards(engine)
    reqs = [[_item(f"r{i}", p)] for i, p in enumerate(_prompts(32))]
    _run_concurrently(engine, reqs)
    assert all(len(r[0].output_ids) == 8 for r in reqs)
    # every request prefilled and decoded together; a few extra steps for late joiners at most
    assert count.n <= 3 * 9, f"{count.n} model forwards for 32 requests of 8 tokens"


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_batched_logprobs_are_the_models(model_dir, hf_model, temperature):
    engine = CpuEngine(str(model_dir), random_seed=3)
    reqs = [
        [_item(f"r{i}", p, temperature=temperature, max_new_tokens=5 + i % 4)]
        for i, p in enumerate(_prompts(12, seed=1))
    ]
    _run_concurrently(engine, reqs, stagger_s=0.002)
    for (it,) in reqs:
        ref = _reference_logprobs(hf_model, it, temperature)
        assert it.finish == {"type": "length", "length": len(it.output_ids)}
        assert torch.allclose(torch.tensor(it.output_logprobs), torch.tensor(ref), atol=1e-5)


def test_prompt_logprobs_for_prefill_scoring(model_dir, hf_model):
    """``max_new_tokens=0`` with ``logprob_start_len``: untempered prompt log-probs from the
    given start, the first entry None (SGLang's layout), while other requests decode."""
    engine = CpuEngine(str(model_dir))
    prompts = _prompts(6, seed=2)
    scoring = []
    for i, p in enumerate(prompts):
        it = _item(f"s{i}", p, max_new_tokens=0, temperature=0.5)
        it.logprob_start_len = i % 3
        scoring.append([it])
    decoding = [[_item(f"d{i}", p, max_new_tokens=6)] for i, p in enumerate(_prompts(6, seed=3))]
    _run_concurrently(engine, decoding + scoring)
    for (it,), p in zip(scoring, prompts):
        with torch.no_grad():
            logits = hf_model(input_ids=torch.tensor([p])).logits[0].float()
        lp = F.log_softmax(logits[:-1], dim=-1).gather(1, torch.tensor(p[1:])[:, None])
        # SGLang 0.5.23: one entry per token from logprob_start_len on, the first always None
        want = [None, *lp.squeeze(1).tolist()[it.logprob_start_len :]]
        assert it.output_ids == [] and it.finish == {"type": "length", "length": 0}
        assert [x is None for x in it.input_logprobs] == [x is None for x in want]
        got = [x for x in it.input_logprobs if x is not None]
        assert torch.allclose(
            torch.tensor(got), torch.tensor([x for x in want if x is not None]), atol=1e-5
        )


def test_deterministic_inference_is_batch_invariant(model_dir):
    """Seeded requests give the same bits alone as among 23 others of other lengths that arrive
    at other times (SGLang's deterministic inference is batch-invariant kernels)."""
    prompts = _prompts(24, seed=4)

    def req(i, p):
        return [_item(f"r{i}", p, sampling_seed=1000 + i, max_new_tokens=4 + i % 7)]

    alone = []
    engine = CpuEngine(str(model_dir), deterministic=True)
    for i in (0, 5, 17):
        r = req(i, prompts[i])
        _run_concurrently(engine, [r])
        alone.append(r[0])
    engine = CpuEngine(str(model_dir), deterministic=True)
    together = [req(i, p) for i, p in enumerate(prompts)]
    _run_concurrently(engine, together, stagger_s=0.003)
    for a in alone:
        b = together[int(a.rid[1:])][0]
        assert a.output_ids == b.output_ids
        assert a.output_logprobs == b.output_logprobs  # bit for bit


def test_greedy_without_deterministic_inference_agrees_to_rounding(model_dir):
    prompts = _prompts(16, seed=6)
    engine = CpuEngine(str(model_dir))
    alone = [[_item("a", prompts[3], temperature=0.0)]]
    _run_concurrently(engine, alone)
    together = [[_item(f"r{i}", p, temperature=0.0)] for i, p in enumerate(prompts)]
    _run_concurrently(engine, together)
    a, b = alone[0][0], together[3][0]
    assert a.output_ids == b.output_ids
    assert torch.allclose(
        torch.tensor(a.output_logprobs), torch.tensor(b.output_logprobs), atol=1e-5
    )


def test_an_aborted_row_leaves_and_the_others_finish(model_dir):
    engine = CpuEngine(str(model_dir), deterministic=True)
    long = [_item("long", [5, 6, 7], max_new_tokens=400)]
    short = [[_item(f"s{i}", p, sampling_seed=i)] for i, p in enumerate(_prompts(4, seed=7))]
    t = threading.Thread(target=_run_concurrently, args=(engine, [long]))
    t.start()
    time.sleep(0.2)
    assert engine.abort("long", abort_all=False)
    _run_concurrently(engine, short)
    t.join(30)
    assert long[0].finish["type"] == "abort" and 0 < len(long[0].output_ids) < 400
    # the same short requests on a fresh engine, alone: same bits
    for (it,) in short:
        again = [_item(it.rid, it.input_ids, sampling_seed=int(it.rid[1:]))]
        _run_concurrently(CpuEngine(str(model_dir), deterministic=True), [again])
        assert again[0].output_ids == it.output_ids
    assert not engine.busy
