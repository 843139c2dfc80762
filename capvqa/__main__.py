"""``python -m capvqa`` (also what ``torchrun -m capvqa`` runs)."""

from capvqa.cli import main

main()
