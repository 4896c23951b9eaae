"""Sources for scripts and tests that already hold raw messages in memory."""
from __future__ import annotations

from eclreco import _core
from eclreco.framework import Module


class MessageSource(Module):
    """Hands a list of raw messages (wire-format envelopes) to the path, batch by batch."""

    def __init__(self, messages=()):
        super().__init__()
        self.messages = list(messages)
        self.pos = 0

    def is_source(self):
        return True

    def next_batch(self, batch, max_events):
        chunk = self.messages[self.pos:self.pos + max_events]
        self.pos += len(chunk)
        _core.append_envelopes(batch, chunk)
        return self.pos < len(self.messages)
