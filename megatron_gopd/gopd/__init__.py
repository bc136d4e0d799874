"""The G-OPD algorithm as pure tensor functions: no torch.distributed, no Megatron, no argparse.

Generalized On-Policy Distillation (arXiv 2602.12125). For a response token ``y_t`` sampled from
the student::

    A_t = (log pi_theta(y_t) - log pi*(y_t)) + (lambda - 1) (log pi_ref(y_t) - log pi*(y_t))

and the student minimises the masked mean of ``sg[A_t] * log pi_theta(y_t)``. pi* is the teacher,
pi_ref the reference (never called "ref" for the teacher). :mod:`megatron_gopd.gopd.fdiv` is the
OPD+ variant: an f-divergence to the teacher with the unbiased (corrected stop-gradient)
advantage. The Megatron glue is :mod:`megatron_gopd.trainer.loss`; the vocab-parallel pieces are
in :mod:`megatron_gopd.vocab_parallel`.
"""

from megatron_gopd.gopd.advantages import as_token_lambda, gopd_advantages, implicit_reward
from megatron_gopd.gopd.aggregation import (
    label_mask,
    masked_row_sums,
    row_contributions,
    shift_labels,
)
from megatron_gopd.gopd.config import GOPDLossConfig, LossConfigError
from megatron_gopd.gopd.fdiv import DIVERGENCES, FDivAdvantages, fdiv_advantages, fdiv_terms
from megatron_gopd.gopd.importance import ISWeights, truncated_is_weights
from megatron_gopd.gopd.metrics import build_report, finalize_report, token_metrics

__all__ = [
    "DIVERGENCES",
    "FDivAdvantages",
    "GOPDLossConfig",
    "ISWeights",
    "LossConfigError",
    "as_token_lambda",
    "build_report",
    "fdiv_advantages",
    "fdiv_terms",
    "finalize_report",
    "gopd_advantages",
    "implicit_reward",
    "label_mask",
    "masked_row_sums",
    "row_contributions",
    "shift_labels",
    "token_metrics",
    "truncated_is_weights",
]
