"""Readers and writers: one module per on-disk dialect, plus lazy base-model readers."""
