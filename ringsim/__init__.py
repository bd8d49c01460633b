"""ringsim: ring dilated attention, a NumPy reference, and a simulated cluster to run it on.

Subpackages: :mod:`ringsim.reference` (NumPy). Shared pieces live here: the configuration
and its validation (:mod:`ringsim.config`) and the tolerance table (:mod:`ringsim.tolerance`).
"""

from .config import DilatedConfig, Mode, Pattern, PatternGroup, make_config, validate

__all__ = ["DilatedConfig", "Mode", "Pattern", "PatternGroup", "make_config", "validate"]
__version__ = "0.1.0"
