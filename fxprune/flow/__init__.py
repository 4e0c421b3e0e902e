"""The user-facing flow (``compile``, ``prepare``, ``finalize``, the CLI): above the core, the
passes and the backends, which never import it."""
