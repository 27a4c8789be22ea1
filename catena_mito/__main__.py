"""``python -m catena_mito`` (also what ``torchrun -m catena_mito`` runs)."""

from catena_mito.cli import main

main()
