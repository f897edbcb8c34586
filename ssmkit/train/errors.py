"""The error training raises when it cannot go on (kept apart so the CLI can import it cheaply)."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many NaN/inf steps); the message says why and what to try."""
