"""What of a growing answer can be shown while stop strings may still match: all of it but the longest tail that
could be the start of a stop string (so a 200-character stop string that never comes holds back nothing of an answer
that does not end like its beginning, where holding back its length would hold the whole answer to the end)."""


def shown(text: str, stops: tuple[str, ...]) -> str:
    """`text` less its longest suffix that is a proper prefix of some stop string, less half characters (U+FFFD of
    an incomplete byte sequence) and trailing spaces, which the final answer may drop."""
    cut = len(text)
    for stop in filter(None, stops):  # an empty stop string matches at once, elsewhere
        start = max(0, len(text) - len(stop) + 1)  # a tail as long as the stop string would have matched
        while (start := text.find(stop[0], start)) != -1 and start < cut:
            if stop.startswith(text[start:]):
                cut = start  # the earliest such start is the longest such tail
                break
            start += 1
    return text[:cut].rstrip("\ufffd").rstrip()
