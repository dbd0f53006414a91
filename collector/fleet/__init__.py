"""The fleet: wire model and decoder, per-terminal state, detection, registry and snapshots."""
