"""The Stop buttons: a per-session flag the running handler checks between tokens.

Gradio's own ``cancels=`` kills the event mid-flight; a token already on its way can then land
after the cancel and the page may show "Error" over the outputs. A flag instead lets the handler
end its stream normally (closing the engine request) and say "stopped" in its last update.
"""

from __future__ import annotations

import threading
from typing import Any


class StopFlag:
    """Set by a tab's Stop button, cleared when that tab's next request starts."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def arm(self) -> None:
        """Called as a request starts: an old Stop press does not stop it."""
        self._event.clear()

    def stop(self) -> None:
        """Asks the running request to stop after its current token."""
        self._event.set()

    @property
    def stopped(self) -> bool:
        """Whether Stop was pressed since the request started."""
        return self._event.is_set()

    def __deepcopy__(self, memo: dict[int, Any]) -> StopFlag:
        # gr.State deep-copies its initial value for each browser session: each gets a fresh flag.
        return StopFlag()
