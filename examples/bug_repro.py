"""PyTorch issue #51800 side by side: upstream's two spectral-norm APIs and safe_norm's, in
eval() right after construction and over the first training steps.

The code lives in the package (``safe_norm/_demo.py``) so that ``python -m safe_norm demo`` runs
it from any install; this script is the same demo from a clone.

Run:  python examples/bug_repro.py [--plot sigma_error.png] [--steps N]
"""

import sys

from safe_norm._demo import main

if __name__ == "__main__":
    sys.exit(main())
