"""Helpers that start real services (SeaweedFS) for tests and benchmarks; never imported by snapfs itself."""
