"""Transports: thin adapters over what each broker already does well (see base.Transport)."""
