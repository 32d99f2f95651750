"""Peer servers the benchmark compares imagegen-serve with; each runs as its own process."""
