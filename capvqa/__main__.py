"""``python -m capvqa`` (also what ``torchrun -m capvqa`` runs).

``-m`` puts the current folder first on ``sys.path``; a stray ``yaml.py`` or ``torch.py`` there would
then be imported in place of the real package. capvqa is already imported at this point, so the current
folder is dropped from the path before anything else loads.
"""

import os
import sys

if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from capvqa.cli import main  # noqa: E402

main()
