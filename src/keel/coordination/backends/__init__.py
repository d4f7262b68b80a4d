"""Coordination backends: thin adapters over each server's leases (see `base.Backend`)."""
