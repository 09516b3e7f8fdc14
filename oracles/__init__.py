"""The truth for attnverify: attention semantics and framework-free references (numpy, mpmath)."""
