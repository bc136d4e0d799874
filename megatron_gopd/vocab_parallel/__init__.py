"""Vocab-parallel autograd functions: per-token quantities from logits whose vocabulary is split
over the tensor-parallel ranks, without gathering the vocabulary (megatron-core's
``tensor_parallel/cross_entropy.py`` is the model).

* :mod:`~megatron_gopd.vocab_parallel.logprobs`: ``log p(y)`` of the sampled token and the
  entropy (the sampled-token G-OPD loss, scoring).
* :mod:`~megatron_gopd.vocab_parallel.gopd_objective`: the full-vocabulary and top-k estimators of
  the G-OPD objective from the student's, teacher's and reference's logits.
* :mod:`~megatron_gopd.vocab_parallel.output_layer`: the output layer itself in fp32, chunk by
  chunk, with autograd: final hidden states in, the above per token out, never all the logits of a
  micro-batch at once (every role's log-probs, the student update included).
* :mod:`~megatron_gopd.vocab_parallel.chunking`: the row chunks and reused fp32 scratch buffers
  both work through, so extra memory does not grow with tokens x vocabulary.

Every function takes the tensor-parallel process group explicitly (None: one rank holds the whole
vocabulary).
"""

from megatron_gopd.vocab_parallel.chunking import DEFAULT_CHUNK_ELEMENTS
from megatron_gopd.vocab_parallel.gopd_objective import (
    GOPDObjective,
    topk_threshold,
    vocab_parallel_gopd_objective,
)
from megatron_gopd.vocab_parallel.logprobs import vocab_parallel_logprobs

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "GOPDObjective",
    "topk_threshold",
    "vocab_parallel_gopd_objective",
    "vocab_parallel_logprobs",
]
