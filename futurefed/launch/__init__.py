"""``fedrun``: start a federation on many hosts, run a program as its origin,
tear everything down (docs/fedrun.md)."""
