"""ampo: iterative self-play preference optimization (AMPO selection, MPO/REFA group losses, gated promotion)."""

__version__ = "0.1.0"
