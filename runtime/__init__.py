"""beamlet's runtime: the harness and its SDK workers (see docs/architecture.md)."""
