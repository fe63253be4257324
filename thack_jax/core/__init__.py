"""Layer 1: helpers every other layer may use (standard library only)."""
