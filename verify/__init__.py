"""attnverify's harness: targets, strategies, tolerance, checks, fuzz campaigns and reports.

Importing ``verify`` imports neither torch nor jax; each target module imports its own framework.
"""

__version__ = "0.1.0"
