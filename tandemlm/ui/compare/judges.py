"""Optional judges of a response shown under each answer in Compare: a reward model and a verifier.

Both are plain callables ``(prompt_messages, response) -> value`` passed to ``create_app``, so a
reward model from ``tandem align reward`` or a rule-based verifier (e.g. math answer checking)
plugs in without the UI knowing what it is. None are set by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tandemlm.models.chat_template import Message

RewardFn = Callable[[Sequence[Message], str], float]
VerifierFn = Callable[[Sequence[Message], str], bool]


@dataclass(frozen=True)
class Judges:
    """The judges in use; either may be None."""

    reward: RewardFn | None = None
    verifier: VerifierFn | None = None


def judge_line(judges: Judges, prompt: Sequence[Message], response: str) -> str:
    """``reward 0.53 · verifier ✓`` for one response (empty when no judges); a failing judge shows its error."""
    parts = []
    if judges.reward is not None:
        try:
            parts.append(f"reward {float(judges.reward(prompt, response)):.3f}")
        except Exception as exc:  # noqa: BLE001 - a broken judge must not lose the comparison
            parts.append(f"reward error: {exc}")
    if judges.verifier is not None:
        try:
            parts.append("verifier ✓" if judges.verifier(prompt, response) else "verifier ✗")
        except Exception as exc:  # noqa: BLE001
            parts.append(f"verifier error: {exc}")
    return " · ".join(parts)
