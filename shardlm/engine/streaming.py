"""Incremental text for streaming: what of a completion's text may be shown so far."""

from __future__ import annotations


def visible_end(text: str, shown: int, finished: bool, stops: list[str]) -> int:
    """End of the text that can be sent now.

    Holds back enough characters that a stop string is never half shown (it may still complete and
    be cut), and an incomplete UTF-8 character (decoded as U+FFFD) until its bytes arrive.
    """
    if finished:
        return max(shown, len(text))
    hold = max((len(s) for s in stops), default=1) - 1
    end = len(text) - hold
    if text.endswith("\ufffd"):
        end = min(end, len(text) - 1)
    return max(shown, end)
