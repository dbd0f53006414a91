"""Ingest: broker clients that deliver raw messages and acknowledge them once applied."""
