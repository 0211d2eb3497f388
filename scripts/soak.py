"""Soak harness (#26): many generations, and a long server run, while the draft fails on
purpose; and a replay of a Spec-Bench run's questions through the server, each answer checked
against the run's `ar` output. The harness is the package mirror_sd/soak/ (its docstring and
docs/soak.md say what each run does); this script is its command line.

    python scripts/soak.py sequential --out soak/sequential [--generations 1000]
    python scripts/soak.py server --out soak/server [--duration 1800] [--clients 8]
    python scripts/soak.py replay --reference RUN_DIR --out soak/replay [--clients 4] [--resume]
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(ROOT))

from mirror_sd.soak.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
