"""``python -m megatron_gopd.cpu_server``: see :mod:`megatron_gopd.cpu_server.server`."""

import sys

from megatron_gopd.cpu_server.server import main

if __name__ == "__main__":
    sys.exit(main())
