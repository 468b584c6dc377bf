"""Small shared helpers (atomic files, seeding, logging)."""
