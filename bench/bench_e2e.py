"""End-to-end benchmark of altclip_fast against transformers: see altclip_fast/apps/benchmark.py.

    python bench/bench_e2e.py --quick            # same as `altclip-fast bench --quick`
"""

import sys

from altclip_fast.apps.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
