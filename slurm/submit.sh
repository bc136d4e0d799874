#!/usr/bin/env bash
# Submit a recipe: the site config and the recipe become sbatch options, and slurm/gopd.sbatch
# runs with the same arguments.
#
#   slurm/submit.sh [--dry-run] [--site FILE] [--set NAME=VALUE]... RECIPE [ARG...]
#
# --dry-run prints the sbatch command and then what every node would run; it needs no Slurm.
# Extra sbatch options (a dependency, --wait, a reservation) go in GOPD_SBATCH_ARGS, e.g.
#   GOPD_SBATCH_ARGS="--wait --dependency=afterok:123" slurm/submit.sh examples/x.sh
set -euo pipefail

GOPD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export GOPD_ROOT
# shellcheck source=slurm/lib.sh
source "$GOPD_ROOT/slurm/lib.sh"

main() {
    gopd_parse_args "$@"
    gopd_load
    local extra=()
    # word-splitting on purpose: a list of options in one variable
    read -r -a extra <<<"${GOPD_SBATCH_ARGS:-}"
    gopd_sbatch_command
    # options must come before the script name
    CMD=("${CMD[0]}" "${extra[@]}" "${CMD[@]:1}")
    if ((DRY_RUN)); then
        gopd_plan
        printf '## submit (on this host)\n'
        gopd_print_cmd "${CMD[@]}"
        printf '\n'
        gopd_print_plan
        return 0
    fi
    # sbatch cannot create the directory of its --output file
    mkdir -p "$LOG_ROOT"
    "${CMD[@]}"
}

main "$@"
