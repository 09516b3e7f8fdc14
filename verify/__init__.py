"""attnverify's harness: targets, strategies, tolerance, checks, fuzz campaigns and reports.

The public surface for a kernel repository's own tests is small and explicit::

    from verify import assert_attention_close, strategies

(``verify.api``). Importing ``verify`` imports neither torch nor jax; each target module imports
its own framework.
"""

from verify import strategies
from verify.api import assert_attention_close

__version__ = "0.1.0"
__all__ = ["assert_attention_close", "strategies"]
