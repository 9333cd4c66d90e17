"""Helpers every layer may use (atomic run-file writing, a vLLM-on-CPU workaround); they import nothing else of
trl_tip, so any layer can depend on them without depending on another layer."""
