"""Words in messages: counts with the right plural ("1 loop", "4 loops")."""


def plural(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"
