# shellcheck shell=bash
# shellcheck disable=SC2034  # recipes set knobs that slurm/lib.sh reads
# Strong-to-weak ExOPD with reward correction: as exopd-qwen3-1.7b-strong-to-weak.sh, but the
# reference is the teacher's pre-RL base (Qwen3-4B-Non-thinking), so the extrapolated reward
# log pi* - log pi_ref is the one the teacher's RL actually learned. The reference is as large as
# the teacher.
#
#   slurm/submit.sh --dry-run examples/exopd-qwen3-1.7b-reward-correction.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=examples/exopd-qwen3-1.7b-strong-to-weak.sh
source "$HERE/exopd-qwen3-1.7b-strong-to-weak.sh"

ARGS=("${STRONG_TO_WEAK_ARGS[@]}" --ref-load "$MCORE/Qwen3-4B")
