# shellcheck shell=bash
# shellcheck disable=SC2034  # sourced by slurm/lib.sh, which reads these
# Site config: what differs from one cluster to the next. Copy it (or edit it in place) and pass
# it with `--site FILE` or GOPD_SITE=FILE; slurm/submit.sh reads it on the submit host, and every
# node reads it again inside the job. Empty values mean "not needed here".

# --- scheduler -----------------------------------------------------------------------------------
SITE_PARTITION=""   # sbatch --partition
SITE_ACCOUNT=""     # sbatch --account
SITE_QOS=""         # sbatch --qos
# How the job asks for GPUs: gpus-per-node (--gpus-per-node=N), gres (--gres=gpu:N), or none
# (clusters without GPU GRES, where every job sees the node's GPUs; with GRES, job steps only get
# the GPUs the job asked for).
SITE_GPU_REQUEST=gpus-per-node
# Anything else sbatch needs here, e.g. (--exclusive --mem=0 --cpus-per-task=96 --reservation=x).
SITE_SBATCH_ARGS=()
# Extra srun arguments for the per-node steps, e.g. (--mpi=pmix) or (--cpu-bind=none).
SITE_SRUN_ARGS=()

# --- software ------------------------------------------------------------------------------------
# A container image run through pyxis/enroot (srun --container-image), e.g.
# "nvcr.io#nvidia/pytorch:25.06-py3" or a squashfs file. The checkout and the log directory are
# mounted at the same paths automatically; add datasets and checkpoints here ("src:dst,src2:dst2").
SITE_CONTAINER_IMAGE=""
SITE_CONTAINER_MOUNTS=""
SITE_CONTAINER_ARGS=() # e.g. (--container-writable --no-container-mount-home)
# Environment modules loaded on every node before anything runs (leave empty with a container).
SITE_MODULES=()        # e.g. (cuda/12.8 nccl/2.27)
# Shell commands run on every node after the modules, e.g. activating a virtual environment:
# SITE_SETUP='source "$HOME/venvs/gopd/bin/activate"'
SITE_SETUP=""
# The interpreter that runs torchrun, the trainer and the SGLang servers.
SITE_PYTHON=python3

# --- network -------------------------------------------------------------------------------------
# The interface NCCL's bootstrap and gloo use (the fast network's IP interface), e.g. "ib0" or
# "bond0"; "^docker,lo" excludes instead.
SITE_SOCKET_IFNAME=""
# Further NAME=VALUE settings for every node, applied after slurm/env.sh's own. InfiniBand /
# RoCE examples (ask your admins; wrong values make NCCL fall back to TCP or hang):
#   NCCL_IB_HCA=mlx5_0,mlx5_1,...  which HCAs NCCL may use
#   NCCL_IB_GID_INDEX=3            RoCE v2 GID
#   NCCL_IB_TIMEOUT=22             longer IB retry timeout on large fabrics
#   NCCL_DEBUG=WARN                INFO to see which transport NCCL picked
SITE_ENV=()

# --- test clusters only --------------------------------------------------------------------------
# Where several Slurm nodes are one host (emulated nodes), node i's rollout servers listen on
# ports shifted by i * this so they do not collide. Keep 0 on real clusters.
SITE_SHARED_HOST_PORT_OFFSET=0
