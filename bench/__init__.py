"""``make bench``: the service measured against baselines taken in the same run (SPEC §11)."""
