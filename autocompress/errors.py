"""The one exception type users see: a single sentence naming the bad value and what is allowed."""


class AutocompressError(ValueError):
    """Bad input or an impossible request, explained in one sentence."""


def one_of(kind: str, value: object, allowed) -> AutocompressError:
    """Build the standard 'unknown X' error listing what is allowed (each name once)."""
    allowed = ", ".join(sorted({str(a) for a in allowed}))
    return AutocompressError(f"unknown {kind} {value!r}; allowed: {allowed}")
