# shellcheck shell=bash
# shellcheck disable=SC2034  # sourced by slurm/lib.sh, which reads these
# Site config of the one-host test cluster (slurm/ci/cluster.sh): CPU only, no container.

# the test cluster has no GPU GRES: asking for GPUs would make the job unschedulable
SITE_GPU_REQUEST=none
# the interpreter of the environment under test (a venv's python), else whatever python3 is
SITE_PYTHON=${GOPD_PYTHON:-python3}
# every node is a network namespace with one interface, gopd0, and an address of its own on it
# (slurm/ci/cluster.sh): gloo between nodes goes over it, and ports do not collide across nodes
SITE_SOCKET_IFNAME=gopd0
SITE_SHARED_HOST_PORT_OFFSET=0
