"""Run a function on N CPU ranks (gloo) from a test or a benchmark.

Ranks are forked from the calling process, which has already paid the ~9 s ``import megatron.core``:
a 4-rank group starts in under a second this way, against ~25 s for spawn or torchrun on 2 cores.
Forking is only safe if the parent never started torch's OpenMP pool, so the parent must call
``torch.set_num_threads(1)`` before its first tensor op (``tests/conftest.py`` does).

Results travel back through a queue as ``torch.save`` bytes, so tensors may be returned.
A rank that raises makes the whole call raise :class:`RankFailure` with every rank's traceback;
a hang is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from megatron_gopd.utils import free_port

__all__ = ["RankFailure", "run_distributed"]


class RankFailure(RuntimeError):
    pass


def _dumps(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(b: bytes):
    return torch.load(io.BytesIO(b), weights_only=False)


def _worker(rank, world_size, port, fn, args, kwargs, q, parallel):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    from megatron_gopd import parallel as par
    from megatron_gopd import platform

    try:
        platform.setup()
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        if parallel is not None:
            par.initialize(parallel)
        out = fn(*args, **kwargs)
        q.put((rank, True, _dumps(out)))
    except BaseException as e:
        q.put((rank, False, "".join(traceback.format_exception(e))[-8000:]))
    finally:
        with contextlib.suppress(Exception):
            par.destroy()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args,
    parallel=None,
    timeout: float = 300.0,
    start_method: str = "fork",
    **kwargs,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results.

    ``parallel``: a :class:`megatron_gopd.parallel.ParallelConfig` to initialise Megatron's
    model-parallel groups before ``fn`` runs (omit for plain torch.distributed).
    """
    ctx = mp.get_context(start_method)
    q = ctx.Queue()
    port = free_port()
    procs = [
        # not daemonic: ranks may start processes of their own (dist_checkpointing's writers)
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, q, parallel))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    first_failure = None
    try:
        while len(results) + len(failures) < world_size:
            now = time.monotonic()
            # once a rank failed, the others are likely stuck in a collective: a short grace only
            if now > deadline or (first_failure is not None and now > first_failure + 5.0):
                break
            try:
                rank, ok, payload = q.get(timeout=0.5)
            except queue_mod.Empty:
                for i, p in enumerate(procs):
                    if p.exitcode not in (0, None) and i not in results and i not in failures:
                        failures[i] = f"rank {i} died with exit code {p.exitcode}"
                        first_failure = first_failure or time.monotonic()
                continue
            if ok:
                results[rank] = _loads(payload)
            else:
                failures[rank] = payload
                first_failure = first_failure or time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=5.0 if not failures else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if failures or len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results) - set(failures))
        msg = [f"{len(failures)} of {world_size} ranks failed"]
        if missing:
            msg.append(f"ranks {missing} did not finish within {timeout:.0f}s")
        for r in sorted(failures):
            msg.append(f"--- rank {r} ---\n{failures[r]}")
        raise RankFailure("\n".join(msg))
    return [results[r] for r in range(world_size)]


# ---------------------------------------------------------------------------------- tiny HF models

TINY_DIMS = dict(
    vocab_size=250,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_hf_config(family: str, *, tied: bool = False, **over):
    """A small random-init HF config of ``family`` (llama | llama3 | qwen2 | qwen3 | qwen3_moe)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    kw = dict(TINY_DIMS, tie_word_embeddings=tied, rms_norm_eps=1e-6)
    if family == "llama":
        kw.update(rope_theta=10000.0, rms_norm_eps=1e-5)
        cls = LlamaConfig
    elif family == "llama3":
        kw.update(
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        cls = LlamaConfig
    elif family == "qwen2":
        kw.update(rope_theta=1000000.0)
        cls = Qwen2Config
    elif family == "qwen3":
        # explicit head_dim different from hidden/heads, as in Qwen3-4B (2560/32 != 128)
        kw.update(rope_theta=1000000.0, head_dim=32)
        cls = Qwen3Config
    elif family == "qwen3_moe":
        # 4 experts, top-2, renormalised (Qwen3-30B-A3B's router), one dense layer among them
        kw.update(
            rope_theta=1000000.0,
            head_dim=32,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            router_aux_loss_coef=0.0,
        )
        cls = Qwen3MoeConfig
    else:
        raise ValueError(family)
    kw.update(over)
    return cls(**kw)


def make_tiny_hf_model(
    path, family: str = "qwen3", *, tied: bool = False, seed: int = 0, dtype=torch.float32, **over
):
    """Save a random tiny HF causal LM at ``path`` (weights perturbed so norms are not all ones)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_hf_config(family, tied=tied, **over)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # RMSNorm weights start at 1: make them informative
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("mlp.gate.weight"):  # an MoE router: clear top-k decisions
                p.normal_(0.0, 0.5)
            elif p.dim() == 1:  # biases start at 0
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 0.08)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(str(path))
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_tokenizer(path, alphabet: str | None = None):
    """A character-level HF tokenizer (fast), saved at ``path``; returns it.

    Ids 0-4 are ``<pad> <s> </s> <|user|> <|assistant|>``, then one id per character of
    ``alphabet``. Ships a chat template, so ``apply_chat_template`` works offline.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = alphabet or "0123456789abcdefghijklmnopqrstuvwxyz +-*/=?.,:()<>|_"
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?" if "?" in vocab else None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


# ---------------------------------------------------------------------------------- tiny G-OPD world


TINY_ALPHABET = "abcdefgh "


def _convert(hf_dir, out_dir):
    from megatron_gopd.convert.checkpoint import convert_hf_to_megatron

    convert_hf_to_megatron(hf_dir, out_dir)


def _convert_here_or_in_a_fork(hf_dir, out_dir, fork: bool = True) -> None:
    """Conversion sets up a process group of one (gloo). A process that forks ranks later
    (pytest) must never have had one: a fork of a process that ran gloo hangs in its next
    ``new_group``. So a test process converts in a forked rank, unless a rank is already running
    here; a script that forks nothing (``fork=False``) converts in its own process."""
    import torch.distributed as dist

    if dist.is_initialized() or not fork:
        _convert(str(hf_dir), str(out_dir))
    else:
        run_distributed(_convert, 1, str(hf_dir), str(out_dir))


def make_tiny_distillation_world(
    root,
    models: tuple[str, ...] = ("student", "teacher", "teacher2", "teacher_base"),
    *,
    fork: bool = True,
) -> dict:
    """Tokenizer + student (2 layers) + teacher and its "pre-RL base" (4 layers, wider) + data.

    Random models: what the tests check (the reverse KL to the teacher falls, log-probs agree,
    routing, resumption) does not need trained ones. ``models``: the ones to make (each
    conversion costs a few seconds). ``fork``: convert in forked ranks (from a test process) or
    in this process (from a script; see :func:`_convert_here_or_in_a_fork`)."""
    from pathlib import Path

    root = Path(root)
    tok = make_tiny_tokenizer(root / "tok", alphabet=TINY_ALPHABET)
    small = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=len(tok),
        max_position_embeddings=64,
    )
    big = dict(small, hidden_size=64, intermediate_size=128, num_hidden_layers=4, head_dim=16)
    paths = {}
    for name, dims, seed in (
        ("student", small, 1),
        ("teacher", big, 2),
        ("teacher2", big, 3),
        ("teacher_base", big, 4),
    ):
        if name not in models:
            continue
        hf = root / "hf" / name
        make_tiny_hf_model(hf, "qwen3", seed=seed, tied=True, **dims)
        tok.save_pretrained(str(hf))
        _convert_here_or_in_a_fork(hf, root / name, fork=fork)
        paths[name] = root / name
    import json
    import random

    rng = random.Random(0)

    def lines(n, domains):
        out = []
        for i in range(n):
            s = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 6)))
            out.append(
                {"prompt": s, "answer": s[::-1], "domain": domains[i % len(domains)], "id": i}
            )
        return out

    for name, n, domains in (
        ("train", 64, ["math"]),
        ("eval", 16, ["math"]),
        ("train2", 64, ["math", "code"]),
        ("eval2", 16, ["math", "code"]),
    ):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in lines(n, domains)))
        paths[name] = path
    return paths
