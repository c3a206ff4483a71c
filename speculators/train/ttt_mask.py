"""Moved to `speculators.models.eagle3.ttt_mask` (the model needs it; train imports down).

Kept as a re-export so code written against the old path still imports; new code should
import from the model package.
"""

from speculators.models.eagle3.ttt_mask import *  # noqa: F401,F403
from speculators.models.eagle3.ttt_mask import __all__  # noqa: F401
