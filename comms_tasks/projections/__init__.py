"""Upstream events applied to the read models (therapists, requests, patients) and their
tasks. The last stage: it may import every other stage (an erasure reaches them all)."""
