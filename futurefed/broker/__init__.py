"""The broker: ``state`` (sans-I/O scheduling) and ``core`` (its poll loop)."""
