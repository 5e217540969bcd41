"""The archivist: sealed segments, signed checkpoints, proofs, mirrors and retention (docs/archive.md)."""
