"""``flower-supernode`` with another node heartbeat interval, for ``LocalDeployment(heartbeat_interval=...)``:

    python deploy/supernode_heartbeat.py SECONDS <flower-supernode's arguments>

Flower 1.41 has no option for it; ``common.flower_glue.run_supernode_with_heartbeat`` says how it is set.
Run as a file (the SuperNode's working directory is its board folder): it finds the project itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from common.flower_glue import run_supernode_with_heartbeat

    run_supernode_with_heartbeat(float(sys.argv[1]), sys.argv[2:])
