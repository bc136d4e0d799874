"""Forward-only per-token log-probs of given token sequences, for any role.

``score_sequences`` runs a role's model through megatron-core's pipeline schedule (``forward_only``)
in micro-batches of right-padded sequences. On the last pipeline stage the model stops at the final
hidden states; the output layer is then applied in fp32 to chunks of tokens and each chunk is
reduced to log-probs by :func:`~megatron_gopd.vocab_parallel.vocab_parallel_logprobs` at once
(:mod:`megatron_gopd.vocab_parallel.output_layer`), so the largest logits tensor alive is
``[chunk, V / TP]``: peak memory does not grow with tokens x vocabulary, and a bf16 model's
log-probs are those of its fp32 logits. ``temperature`` scores ``softmax(logits / T)``.

The CLI (``gopd-score`` / ``python -m megatron_gopd.scoring``) runs under torchrun::

    torchrun --nproc-per-node 2 -m megatron_gopd.scoring --load MCORE \\
        --input tokens.jsonl --output logprobs.jsonl --tensor-model-parallel-size 2

Input lines: ``{"input_ids": [...], "prompt_len": k}`` (or ``{"text": ...}`` /
``{"prompt": ..., "response": ...}`` with ``--tokenizer``). Output lines repeat the input and add
``"logprobs"``: the log-prob of each token after the prompt given its prefix.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gopd.flags import FlagFormatter, add_flags, config_from_args
from megatron_gopd.models.build import final_hidden_states, output_rows, output_weight
from megatron_gopd.parallel import ParallelConfig
from megatron_gopd.utils import (
    GopdError,
    check_writable,
    cli_errors,
    get_logger,
    json_object_line,
    quiet_expected_warnings,
    read_text_file,
)
from megatron_gopd.vocab_parallel import DEFAULT_CHUNK_ELEMENTS
from megatron_gopd.vocab_parallel.output_layer import (
    OutputLayer,
    default_chunk_rows,
    output_layer_logprobs,
)

__all__ = ["main", "score_sequences"]

log = get_logger(__name__)


def hidden_to_logprobs(
    model,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``[S, B, H]`` final hidden states (``[S / TP, B, H]`` under sequence parallelism) ->
    ``[B, S]`` log-probs of ``labels`` (``[B, S]``) under ``softmax(logits / temperature)``.

    The logits are fp32 (also in a bf16 model) and exist one chunk of tokens at a time
    (:mod:`megatron_gopd.vocab_parallel.output_layer`).
    """
    from megatron.core import parallel_state as ps

    group = (
        ps.get_tensor_model_parallel_group()
        if ps.get_tensor_model_parallel_world_size() > 1
        else None
    )
    weight = output_weight(model)
    layer = OutputLayer(
        output_rows(model, hidden, grad=False), weight, vocab_size, temperature=temperature
    )
    lp, _ = output_layer_logprobs(
        layer,
        labels.reshape(-1),
        group,
        chunk_rows=default_chunk_rows(weight.shape[0], chunk_elements),
    )
    return lp.view(labels.shape)


def _pad_batch(seqs: Sequence[Sequence[int]], length: int, device) -> torch.Tensor:
    out = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out.to(device)


@torch.no_grad()
def _lockstep_pad(batches: list, dummy, group, device) -> None:
    """Expert parallelism: the MoE layers exchange tokens with all-to-alls over the expert group,
    whose ranks score different sequences; every rank must run as many forward passes as the
    busiest one, so the others add ``dummy`` micro-batches (no real rows)."""
    n = torch.tensor([len(batches)], device=device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX, group=group)
    batches += [dummy] * (int(n.item()) - len(batches))


def _progress_bar(progress: bool, total: int, name: str):
    """A bar over the sequences scored, on the one rank that reports (last stage, TP rank 0)."""
    from megatron.core import parallel_state as ps

    if not (progress and ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"scoring ({name})", unit="seq", leave=False)


def score_sequences(
    role,
    sequences: Sequence[Sequence[int]],
    *,
    micro_batch_size: int = 1,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    broadcast: bool = True,
    pad_to_multiple: int = 8,
    progress: bool = False,
    temperature: float = 1.0,
    max_tokens: int | None = None,
) -> list[torch.Tensor] | None:
    """Log-probs of every token after the first, for each sequence, under ``role``'s model at
    ``temperature`` (``log softmax(logits / T)``, fp32 logits: what a rollout engine sampling at
    ``T`` reports for the tokens it samples).

    Every rank of the model-parallel group passes the same ``sequences``. Returns, for sequence
    ``i`` of length ``L``, a float32 CPU tensor of ``L - 1`` values: ``[log p(x_1 | x_0), ...,
    log p(x_{L-1} | x_{<L-1})]``. The result exists on the last pipeline stage; with
    ``broadcast=True`` every stage gets it, otherwise other stages get None.

    ``max_tokens``: pack the sequences into micro-batches of at most that many tokens, laid end to
    end without padding between them (first-fit decreasing; :mod:`megatron_gopd.packing`), instead
    of ``micro_batch_size`` right-padded rows each: compute proportional to the real tokens.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gopd import platform

    lockstep = role.lockstep_group
    if not sequences and lockstep is None:
        return []
    arch = role.arch
    for i, s in enumerate(sequences):
        if len(s) < 2:
            raise GopdError(f"sequence {i} has {len(s)} token(s): nothing to score")
        bad = [t for t in s if not 0 <= int(t) < arch.vocab_size]
        if bad:
            raise GopdError(
                f"sequence {i} has token id {bad[0]} outside the vocabulary [0, {arch.vocab_size})"
            )
        if len(s) > arch.max_position_embeddings:
            raise GopdError(
                f"sequence {i} has {len(s)} tokens, more than the model's "
                f"{arch.max_position_embeddings} positions"
            )
    device = platform.device()
    if max_tokens is not None:
        return _score_packed(
            role,
            sequences,
            max_tokens=max_tokens,
            chunk_elements=chunk_elements,
            broadcast=broadcast,
            pad_to_multiple=pad_to_multiple,
            progress=progress,
            temperature=temperature,
        )
    max_len = max((len(s) for s in sequences), default=2)
    seq_len = -(-max_len // pad_to_multiple) * pad_to_multiple
    seq_len = min(seq_len, max(max_len, arch.max_position_embeddings))
    seq_len = -(-seq_len // role.sequence_multiple) * role.sequence_multiple
    batches = []
    for a in range(0, len(sequences), micro_batch_size):
        chunk = list(sequences[a : a + micro_batch_size])
        # pad the last micro-batch with a dummy copy so all micro-batches have one shape (PP p2p)
        n_real = len(chunk)
        chunk += [chunk[0]] * (micro_batch_size - n_real)
        tokens = _pad_batch(chunk, seq_len, device)
        batches.append((tokens, n_real))
    if lockstep is not None:
        dummy = torch.zeros((micro_batch_size, seq_len), dtype=torch.long, device=device)
        _lockstep_pad(batches, (dummy, 0), lockstep, device)
        if not batches:
            return [] if broadcast or ps.is_pipeline_last_stage() else None
    bar = _progress_bar(progress, len(sequences), role.name)

    def forward_step(data_iterator, model):
        tokens, n_real = next(data_iterator)
        position_ids = torch.arange(seq_len, device=device).unsqueeze(0).expand_as(tokens)
        labels = torch.roll(tokens, shifts=-1, dims=1)
        with final_hidden_states(model):
            hidden = model(tokens, position_ids, None)

        def loss_func(hidden):
            lp = hidden_to_logprobs(
                model,
                hidden,
                labels,
                vocab_size=arch.vocab_size,
                temperature=temperature,
                chunk_elements=chunk_elements,
            )
            if bar is not None:
                bar.update(n_real)
            zero = hidden.new_zeros(())
            return zero, torch.tensor(1, dtype=torch.int), {"logprobs": lp[:n_real].cpu()}

        return hidden, loss_func

    with role.in_use():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=role.chunks,
            num_microbatches=len(batches),
            seq_length=seq_len,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
    if bar is not None:
        bar.close()
    result = None
    if ps.is_pipeline_last_stage():
        full = torch.cat([o["logprobs"] for o in outputs], dim=0)  # [N, seq_len]
        result = full[: len(sequences)]
    if not sequences:
        return [] if broadcast or ps.is_pipeline_last_stage() else None
    if broadcast and ps.get_pipeline_model_parallel_world_size() > 1:
        if result is None:
            result = torch.empty((len(sequences), seq_len), dtype=torch.float32)
        buf = result.to(device)
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(buf, src=src, group=ps.get_pipeline_model_parallel_group())
        result = buf.cpu()
    if result is None:
        return None
    return [result[i, : len(s) - 1].clone() for i, s in enumerate(sequences)]


def _score_packed(
    role,
    sequences,
    *,
    max_tokens,
    chunk_elements,
    broadcast,
    pad_to_multiple,
    progress,
    temperature,
):
    """:func:`score_sequences` on packed micro-batches (one ``[1, T]`` row each)."""
    import math

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gopd import packing, platform
    from megatron_gopd.types import PackedSeqs

    device = platform.device()
    multiple = math.lcm(pad_to_multiple, role.sequence_multiple)
    bins = packing.first_fit_decreasing([len(s) for s in sequences], max_tokens)
    bins = [sorted(b) for b in bins]
    batches = [(PackedSeqs.of([sequences[i] for i in b], multiple, device), b) for b in bins]
    lockstep = role.lockstep_group
    if lockstep is not None:
        _lockstep_pad(batches, (PackedSeqs.of([[0, 0]], multiple, device), []), lockstep, device)
    if not batches:
        return [] if broadcast or ps.is_pipeline_last_stage() else None
    bar = _progress_bar(progress, len(sequences), role.name)

    def forward_step(data_iterator, model):
        pack, idx = next(data_iterator)
        with final_hidden_states(model):
            hidden = model(pack.tokens_1T, None, None, packed_seq_params=pack.params())

        def loss_func(hidden):
            lp = hidden_to_logprobs(
                model,
                hidden,
                pack.labels_1T(),
                vocab_size=role.arch.vocab_size,
                temperature=temperature,
                chunk_elements=chunk_elements,
            )[0]
            if bar is not None:
                bar.update(len(idx))
            spans = list(zip(pack.starts, pack.lengths, strict=True))[: len(idx)]  # no dummy
            out = [lp[a : a + n - 1].cpu() for a, n in spans]
            zero = hidden.new_zeros(())
            return zero, torch.tensor(1, dtype=torch.int), {"logprobs": out, "index": idx}

        return hidden, loss_func

    with role.in_use():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=role.chunks,
            num_microbatches=len(batches),
            seq_length=max(p.num_tokens for p, _ in batches),
            micro_batch_size=1,
            forward_only=True,
        )
    if bar is not None:
        bar.close()
    sizes = [len(s) - 1 for s in sequences]
    flat = None
    if ps.is_pipeline_last_stage():
        result: list = [None] * len(sequences)
        for o in outputs:
            for i, lp in zip(o["index"], o["logprobs"], strict=True):
                result[i] = lp
        flat = torch.cat(result) if result else torch.empty(0)
    if not sequences:
        return [] if broadcast or ps.is_pipeline_last_stage() else None
    if broadcast and ps.get_pipeline_model_parallel_world_size() > 1:
        buf = (flat if flat is not None else torch.empty(sum(sizes))).to(device)
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(buf, src=src, group=ps.get_pipeline_model_parallel_group())
        flat = buf.cpu()
    if flat is None:
        return None
    return [t.clone() for t in torch.split(flat, sizes)]


# ---------------------------------------------------------------------------------- CLI


def _read_inputs(
    path: Path, tokenizer_path: str | None
) -> tuple[list[dict], list[list[int]], list[int]]:
    tok = None
    records, seqs, prompt_lens = [], [], []
    lines = read_text_file(path, "input").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = json_object_line(path, n, line)
        if "input_ids" in rec:
            ids = rec["input_ids"]
            if not (isinstance(ids, list) and all(isinstance(t, int) for t in ids)):
                raise GopdError(f"{path}:{n}: input_ids must be a list of integers")
            plen = int(rec.get("prompt_len", 0))
        elif "text" in rec or "prompt" in rec:
            if tokenizer_path is None:
                raise GopdError(f"{path}:{n}: text input needs --tokenizer")
            if tok is None:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(tokenizer_path)
            if "text" in rec:
                ids, plen = tok(rec["text"])["input_ids"], int(rec.get("prompt_len", 0))
            else:
                p = tok(rec["prompt"])["input_ids"]
                ids, plen = (
                    p + tok(rec.get("response", ""), add_special_tokens=False)["input_ids"],
                    len(p),
                )
        else:
            raise GopdError(
                f"{path}:{n}: needs 'input_ids' (or 'text' / 'prompt' with --tokenizer)"
            )
        if not 0 <= plen <= len(ids):
            raise GopdError(f"{path}:{n}: prompt_len {plen} is outside [0, {len(ids)}]")
        records.append(rec)
        seqs.append(ids)
        prompt_lens.append(plen)
    if not records:
        raise GopdError(f"{path} has no input lines")
    return records, seqs, prompt_lens


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gopd-score",
        description="Per-token log-probs of token sequences under a Megatron checkpoint "
        "(run under torchrun for TP/PP/DP).",
        formatter_class=FlagFormatter,
    )
    p.add_argument("--load", required=True, help="megatron_gopd checkpoint directory")
    p.add_argument("--input", required=True, type=Path, help="jsonl of sequences")
    p.add_argument("--output", required=True, type=Path, help="jsonl to write")
    p.add_argument(
        "--tokenizer",
        help="HF tokenizer directory, for text input (default: the checkpoint's tokenizer/)",
    )
    add_flags(p, ParallelConfig)  # the trainer's layout flags, from the same config
    p.add_argument("--micro-batch-size", type=int, default=1, help="sequences per forward pass")
    p.add_argument("--bf16", action="store_true", help="run the model in bf16 (default: fp32)")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="score log softmax(logits / T): the log-probs a sampler at temperature T reports",
    )
    p.add_argument("--seed", type=int, default=1234, help="random seed")
    p.add_argument(
        "--transformer-impl",
        choices=["auto", "local", "te"],
        default="auto",
        help="layer implementation: Transformer Engine when available (auto), or local",
    )
    return p


@cli_errors
def main(argv: Sequence[str] | None = None) -> int:
    quiet_expected_warnings()
    args = build_parser().parse_args(argv)  # --help before the ~9 s megatron import
    check_writable(args.output, "--output", directory=False)  # before the work, not after it

    from megatron.core import parallel_state as ps

    from megatron_gopd import parallel
    from megatron_gopd.models import build_role, resolve_checkpoint

    ckpt = resolve_checkpoint(args.load)  # fail before spinning up process groups
    if not args.input.is_file():
        raise GopdError(f"input {args.input} does not exist")
    tokenizer = args.tokenizer or (
        str(ckpt / "tokenizer") if (ckpt / "tokenizer").is_dir() else None
    )
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise GopdError(f"--temperature must be a finite number > 0, got {args.temperature}")
    records, seqs, prompt_lens = _read_inputs(args.input, tokenizer)
    parallel.initialize(config_from_args(ParallelConfig, args), seed=args.seed)
    try:
        role = build_role(
            "model",
            ckpt,
            frozen=True,
            params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            spec=args.transformer_impl,
            sequence_parallel=args.sequence_parallel,
        )
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = list(range(dp_rank, len(seqs), dp))
        lps = score_sequences(
            role,
            [seqs[i] for i in mine],
            micro_batch_size=args.micro_batch_size,
            progress=True,
            temperature=args.temperature,
        )
        gathered = [None] * dp if dp_rank == 0 else None
        if dp > 1:
            dist.gather_object(
                list(zip(mine, [lp.tolist() for lp in lps], strict=True)),
                gathered,
                dst=dist.get_global_rank(ps.get_data_parallel_group(), 0),
                group=ps.get_data_parallel_group(),
            )
        else:
            gathered = [list(zip(mine, [lp.tolist() for lp in lps], strict=True))]
        if parallel.is_rank0():
            by_index = {i: lp for part in gathered for i, lp in part}
            args.output.parent.mkdir(parents=True, exist_ok=True)
            tmp = args.output.with_suffix(args.output.suffix + ".tmp")
            with tmp.open("w") as f:
                for i, rec in enumerate(records):
                    start = max(prompt_lens[i], 1) - 1
                    out = dict(rec, logprobs=by_index[i][start:])
                    if "input_ids" not in rec:
                        out["input_ids"], out["prompt_len"] = seqs[i], prompt_lens[i]
                    f.write(json.dumps(out) + "\n")
            tmp.replace(args.output)
            log.info("wrote %d scored sequences to %s", len(records), args.output)
    finally:
        parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
