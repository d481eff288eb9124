"""Who writes a sample: each backend answers `generate(requests)` with one reply per request."""
