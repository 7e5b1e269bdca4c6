"""Corpora, tokenizers and the resumable batch sampler."""
