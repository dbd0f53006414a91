"""Simulation: a fleet of fake terminals with injectable faults, and the one-process demo."""
