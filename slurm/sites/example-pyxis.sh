# shellcheck shell=bash
# shellcheck disable=SC2034  # sourced by slurm/lib.sh, which reads these
# An example of a filled-in site config (see slurm/site.sh for every setting): an H100 cluster
# with pyxis/enroot containers and an InfiniBand fabric. The values are illustrative; the launcher
# tests use this file for the dry run of a 4-node GPU job.
SITE_PARTITION=gpu
SITE_ACCOUNT=my-project
SITE_GPU_REQUEST=gpus-per-node
SITE_SBATCH_ARGS=(--exclusive --mem=0)
SITE_CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.06-py3"
SITE_CONTAINER_MOUNTS="/shared/gopd:/shared/gopd"
SITE_CONTAINER_ARGS=(--no-container-mount-home)
# the image has torch and megatron-core; the project's extras come from the shared checkout
SITE_PYTHON=python
SITE_SOCKET_IFNAME=ib0
SITE_ENV=(
    "NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3"
    NCCL_IB_GID_INDEX=3
    NCCL_DEBUG=WARN
)
