"""De-identification: PS3.15 Annex E with its options, consistent pseudonyms and UIDs."""

from node.deid.engine import DeidentificationError, Deidentifier, Quarantined
from node.deid.profile import Profile

__all__ = ["DeidentificationError", "Deidentifier", "Profile", "Quarantined"]
