"""``flower-supernode`` for an emulated board (deploy/arm64_userland.py), run by that board's Python:

    python3 deploy/emulated_supernode.py START_SECONDS HEARTBEAT_SECONDS <flower-supernode's arguments>

Each ClientApp process gets ``START_SECONDS`` to connect (``common.flower_glue.allow_slow_app_start``
says why an emulated board needs more than Flower's 30 s); ``HEARTBEAT_SECONDS`` > 0 also sets the
node heartbeat as ``deploy/supernode_heartbeat.py`` does. Run as a file: it finds the project itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from common.flower_glue import allow_slow_app_start, run_supernode, run_supernode_with_heartbeat

    allow_slow_app_start(float(sys.argv[1]))
    if float(sys.argv[2]) > 0:
        run_supernode_with_heartbeat(float(sys.argv[2]), sys.argv[3:])
    else:
        run_supernode(sys.argv[3:])
