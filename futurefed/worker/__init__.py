"""The worker: ``loop`` (its socket and task intake) and ``green`` (greenlet
scheduling of tasks)."""
