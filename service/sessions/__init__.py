"""Streaming sessions: a long video (or latent sequence) in successive chunk requests."""
