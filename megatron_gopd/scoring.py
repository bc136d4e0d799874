"""Forward-only per-token log-probs of given token sequences, for any role.

``score_sequences`` runs a role's model through megatron-core's pipeline schedule (``forward_only``)
in micro-batches of right-padded sequences. On the last pipeline stage the model stops at the final
hidden states; the output layer is then applied to chunks of tokens and each chunk is reduced to
log-probs by :func:`~megatron_gopd.vocab_parallel.vocab_parallel_logprobs` at once, so the largest
logits tensor alive is ``[chunk, V / TP]``: peak memory does not grow with tokens x vocabulary.

The CLI (``gopd-score`` / ``python -m megatron_gopd.scoring``) runs under torchrun::

    torchrun --nproc-per-node 2 -m megatron_gopd.scoring --load MCORE \\
        --input tokens.jsonl --output logprobs.jsonl --tensor-model-parallel-size 2

Input lines: ``{"input_ids": [...], "prompt_len": k}`` (or ``{"text": ...}`` /
``{"prompt": ..., "response": ...}`` with ``--tokenizer``). Output lines repeat the input and add
``"logprobs"``: the log-prob of each token after the prompt given its prefix.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_gopd.flags import FlagFormatter, add_flags, config_from_args
from megatron_gopd.models.build import unwrap_model
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
from megatron_gopd.vocab_parallel import DEFAULT_CHUNK_ELEMENTS, vocab_parallel_logprobs

__all__ = ["main", "score_sequences"]

log = get_logger(__name__)


@contextlib.contextmanager
def _final_hidden_states(model):
    """Make the GPTModel return its final (normed) hidden states instead of logits."""
    saved = model.post_process
    model.post_process = False
    try:
        yield
    finally:
        model.post_process = saved


def hidden_to_logprobs(
    model,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    *,
    vocab_size: int,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """``[S, B, H]`` final hidden states (``[S / TP, B, H]`` under sequence parallelism) ->
    ``[B, S]`` log-probs of ``labels`` (``[B, S]``).

    The output layer runs on chunks of tokens; only one chunk's logits exist at a time.
    """
    from megatron.core import parallel_state as ps

    gpt = unwrap_model(model)
    weight = (
        gpt.shared_embedding_or_output_weight()
        if gpt.share_embeddings_and_output_weights
        else gpt.output_layer.weight
    )
    if gpt.config.sequence_parallel:
        # [S/TP, B, H] per rank -> [S, B, H]; the output layer's own gather would mix the chunks'
        # rows across ranks, so the chunks below multiply by this rank's vocabulary slice directly
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    h = hidden.transpose(0, 1).reshape(-1, hidden.shape[-1])  # [B*S, H], row = (b, s)
    flat_labels = labels.reshape(-1)
    v_local = gpt.output_layer.output_size_per_partition
    rows = max(1, chunk_elements // v_local)
    group = (
        ps.get_tensor_model_parallel_group()
        if ps.get_tensor_model_parallel_world_size() > 1
        else None
    )
    out = torch.empty(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    for a in range(0, h.shape[0], rows):
        b = min(h.shape[0], a + rows)
        logits = torch.nn.functional.linear(h[a:b], weight)  # [rows, V / TP], no bias
        lp, _ = vocab_parallel_logprobs(
            logits,
            flat_labels[a:b],
            group,
            vocab_size=vocab_size,
            chunk_elements=chunk_elements,
        )
        out[a:b] = lp
        del logits
    return out.view(labels.shape)


def _pad_batch(seqs: Sequence[Sequence[int]], length: int, device) -> torch.Tensor:
    out = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out.to(device)


@torch.no_grad()
def score_sequences(
    role,
    sequences: Sequence[Sequence[int]],
    *,
    micro_batch_size: int = 1,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    broadcast: bool = True,
    pad_to_multiple: int = 8,
    progress: bool = False,
) -> list[torch.Tensor] | None:
    """Log-probs of every token after the first, for each sequence, under ``role``'s model.

    Every rank of the model-parallel group passes the same ``sequences``. Returns, for sequence
    ``i`` of length ``L``, a float32 CPU tensor of ``L - 1`` values: ``[log p(x_1 | x_0), ...,
    log p(x_{L-1} | x_{<L-1})]``. The result exists on the last pipeline stage; with
    ``broadcast=True`` every stage gets it, otherwise other stages get None.
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
        # Expert parallelism: the MoE layers exchange tokens with all-to-alls over the expert
        # group, whose ranks score different sequences; every rank must run as many forward
        # passes as the busiest one, so the others add all-padding micro-batches (0 real rows).
        n = torch.tensor([len(batches)], device=device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=lockstep)
        dummy = torch.zeros((micro_batch_size, seq_len), dtype=torch.long, device=device)
        batches += [(dummy, 0)] * (int(n.item()) - len(batches))
        if not batches:
            return [] if broadcast or ps.is_pipeline_last_stage() else None
    bar = None
    if progress and ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(sequences), desc=f"scoring ({role.name})", unit="seq", leave=False)

    def forward_step(data_iterator, model):
        tokens, n_real = next(data_iterator)
        position_ids = torch.arange(seq_len, device=device).unsqueeze(0).expand_as(tokens)
        labels = torch.roll(tokens, shifts=-1, dims=1)
        with _final_hidden_states(unwrap_model(model)):
            hidden = model(tokens, position_ids, None)

        def loss_func(hidden):
            lp = hidden_to_logprobs(
                model, hidden, labels, vocab_size=arch.vocab_size, chunk_elements=chunk_elements
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
            role, [seqs[i] for i in mine], micro_batch_size=args.micro_batch_size, progress=True
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
