"""One turn of the Compare tab: policy (left) and reference (right) streamed side by side, then where they diverge.

Both answers stream at once (one thread per side; the engines batch concurrent requests). Each
side keeps its own conversation (see ``conversation``): a follow-up goes to each engine with the
user's turns and that side's own earlier replies. When both answers are in, each is scored under
both models (see ``divergence_scoring``) and shown with its tokens coloured by ``log π_policy − log π_ref``,
next to the judges' verdicts. The finished turn is kept in a ``gr.State`` for the vote buttons
(see ``vote_panel``); the colour scale redraws it without running the models again. This module
runs a turn; ``events`` holds the tab's Gradio handlers, ``layout`` lays the tab out, and ``outputs``
names what a turn shows.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tandemlm.deploy.types import Delta, SamplingParams
from tandemlm.errors import EngineError
from tandemlm.models.chat_template import Message
from tandemlm.ui.chat_tab import Turn, stats_line
from tandemlm.ui.compare.arena import same_model_note, side_seeds
from tandemlm.ui.compare.conversation import BUSY, SIDE_KEYS, Conversation, RunGuard
from tandemlm.ui.compare.divergence import align_tokens
from tandemlm.ui.compare.divergence_scoring import ScoredAnswer, at_temperature_one, measure_note, score_answer
from tandemlm.ui.compare.judges import Judges, judge_line
from tandemlm.ui.compare.outputs import Comparison, TurnOutputs, keeping
from tandemlm.ui.compare.stream_merge import DONE, merge_streams
from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.sampling_controls import sampling_params
from tandemlm.ui.stopping import StopFlag
from tandemlm.ui.votes.records import Side


@dataclass
class SideRun:
    """One side's answer as it streams in."""

    role: str
    model: str
    backend: str = ""
    text: str = ""
    reasoning: str = ""
    tokens: int = 0
    first_token: float | None = None
    elapsed: float = 0.0
    error: str | None = None
    finish: str | None = None
    judged: str = ""
    alias: str = ""  # blind battle: the name shown instead of role and model until the vote
    seed: int | None = None

    def add(self, delta: Delta, elapsed: float) -> None:
        """Folds one streamed delta in."""
        if delta.text or delta.reasoning:
            self.tokens += 1
            self.first_token = self.first_token if self.first_token is not None else elapsed
        self.text += delta.text
        self.reasoning += delta.reasoning
        if delta.usage:
            self.tokens = delta.usage.completion_tokens
        self.finish = delta.finish_reason or self.finish
        self.elapsed = elapsed

    def turn(self) -> Turn:
        """This side's reply as a conversation turn (reasoning kept for the display, not sent back)."""
        return {"role": "assistant", "content": self.text, "reasoning": self.reasoning}

    def stats(self) -> str:
        """The line under the answer: who, length, speed, judges, or the error."""
        if self.alias:
            head = f"**{self.alias}**"
        else:
            head = f"**{self.role}** `{self.model}`" + (f" ({self.backend})" if self.backend else "")
        if self.error:
            return f"{head} · ⚠ {self.error}"
        parts = [head, stats_line(self.tokens, self.elapsed, self.first_token, self.finish), f"{len(self.text)} chars"]
        return " · ".join([*parts, self.judged] if self.judged else parts)


@dataclass
class CompareView:
    """Everything the tab's outputs show, and the conversation and prompt box after this update."""

    conversation: Conversation
    sides: dict[str, SideRun] = field(default_factory=dict)
    user: str = ""  # the turn in flight: shown in both panes until it joins the conversation
    streaming: bool = False
    divergence: dict[str, str] = field(default_factory=lambda: {"left": "", "right": ""})
    comparison: Comparison | None = None
    status: str = ""
    box: str = ""  # the prompt box: emptied once the turn is in the conversation, kept to resend otherwise
    busy: bool = False  # refused: another comparison of this session is running

    def outputs(self) -> TurnOutputs:
        """What the tab shows for this update (the vote status keeps what it shows)."""
        left, right = self.sides.get("left"), self.sides.get("right")
        # Until the turn joins the conversation, its message and the answers so far are shown after it.
        left_bot, right_bot = (
            self.conversation.display(key, self.user, side.turn() if side and self.user else None, self.streaming)
            for key, side in (("left", left), ("right", right))
        )
        return keeping(
            TurnOutputs,
            left_bot=left_bot,
            right_bot=right_bot,
            left_stats=left.stats() if left else "",
            right_stats=right.stats() if right else "",
            left_divergence=self.divergence["left"],
            right_divergence=self.divergence["right"],
            comparison=self.comparison,
            status=self.status,
            conversation=self.conversation,
            prompt=self.box,
        )


def compare_reply(
    slots: dict[str, EngineSlot], judges: Judges, prompt: str, system: str | None, *sampling: Any, **options: Any
) -> Iterator[TurnOutputs]:
    """:func:`compare_views` as the tab's output values (see :meth:`CompareView.outputs`)."""
    for view in compare_views(slots, judges, prompt, system, *sampling, **options):
        yield view.outputs()


def compare_views(
    slots: dict[str, EngineSlot],
    judges: Judges,
    prompt: str,
    system: str | None,
    *sampling: Any,
    stop: StopFlag | None = None,
    blind: bool = False,
    rng: random.Random | None = None,
    conversation: Conversation | None = None,
    guard: RunGuard | None = None,
    unbiased_kl: bool = False,
) -> Iterator[CompareView]:
    """Streams both answers to ``prompt`` as the next turn of ``conversation``, then scores divergence.

    Problems are shown, never raised. ``stop``, once set, ends both answers after their current
    tokens (the partial answers join the conversation; a stopped turn is not votable). ``blind``
    shuffles the sides (``rng``) and hides who answered until the vote; it is fixed when a
    conversation starts. ``guard`` refuses a second comparison while one runs (``busy``).
    ``unbiased_kl`` samples both sides at T=1, top-p 1, top-k off whatever ``sampling`` says.
    """
    guard = guard or RunGuard()
    if not guard.begin():  # checked before arming the flag: a refused click must not undo a Stop press
        yield CompareView(conversation or Conversation.start(), status=BUSY, box=prompt or "", busy=True)
        return
    try:
        yield from _compare(
            slots, judges, prompt, system, sampling, stop or StopFlag(), blind, rng, conversation, unbiased_kl
        )
    finally:
        guard.end()


def _compare(
    slots: dict[str, EngineSlot],
    judges: Judges,
    prompt: str,
    system: str | None,
    sampling: Sequence[Any],
    stop: StopFlag,
    blind: bool,
    rng: random.Random | None,
    conversation: Conversation | None,
    unbiased_kl: bool = False,
) -> Iterator[CompareView]:
    stop.arm()
    view = CompareView(conversation or Conversation.start(blind, rng), box=prompt or "")
    text = (prompt or "").strip()
    if not text:
        view.status = "Type a prompt first."
        yield view
        return
    try:
        params = sampling_params(*sampling)
    except EngineError as exc:
        view.status = f"⚠ {exc}"
        yield view
        return
    params = at_temperature_one(params) if unbiased_kl else params
    seeds, roles = side_seeds(params.seed, rng), view.conversation.roles
    view.sides = {
        key: SideRun(roles[key], slots[roles[key]].model, alias=view.conversation.alias(key), seed=seeds[key])
        for key in SIDE_KEYS
    }
    messages = {key: view.conversation.messages(key, system, text) for key in SIDE_KEYS}
    note = _note(slots, view.conversation, blind)
    view.user, view.streaming = text, True
    view.status = f"{note}  \ngenerating…" if note else "generating…"
    started = time.perf_counter()
    merged = merge_streams(_start(slots, view.sides, messages, params))
    yield view
    try:
        for batch in merged:
            _fold(view.sides, batch, time.perf_counter() - started)
            if stop.stopped:
                for side in view.sides.values():
                    side.finish = side.finish or "stopped"
                _keep_turn(view)
                view.status = "stopped: nothing to vote on"
                yield view
                return
            yield view
    finally:
        merged.close()  # stops both streams and frees the engines' slots
    view.streaming = False
    yield from _finish(slots, judges, view, messages, params, note)


def _note(slots: dict[str, EngineSlot], conversation: Conversation, blind: bool) -> str:
    """The same-model warning, and a word when the blind box changed mid-conversation (it applies to the next)."""
    notes = [same_model_note(slots)]
    if conversation.user_turns and conversation.blind != blind:
        mode = "a blind battle" if conversation.blind else "not blind"
        notes.append(f"This conversation is {mode} to the end: the blind setting applies from the next new conversation.")
    return "  \n".join(n for n in notes if n)


def _keep_turn(view: CompareView) -> None:
    """Moves the turn in flight into the conversation (the prompt box empties: the next message is a follow-up)."""
    view.conversation = view.conversation.extend(view.user, {key: side.turn() for key, side in view.sides.items()})
    view.user, view.box = "", ""


def _fold(sides: dict[str, SideRun], batch: list[tuple[str, object]], elapsed: float) -> None:
    for key, item in batch:
        side = sides[key]
        if isinstance(item, Delta):
            side.add(item, elapsed)
        elif isinstance(item, Exception):
            side.error = str(item) or type(item).__name__
        elif item is DONE:
            side.elapsed = elapsed


def _start(
    slots: dict[str, EngineSlot], sides: dict[str, SideRun], messages: dict[str, list[Message]], params: SamplingParams
) -> dict[str, Iterator[Delta]]:
    streams = {}
    for key, side in sides.items():
        try:
            engine = slots[side.role].get()
            side.backend = engine.info.backend
            streams[key] = engine.chat(messages[key], dataclasses.replace(params, seed=side.seed))
        except EngineError as exc:  # load failure or a prompt over the context length
            side.error = str(exc)
    return streams


def _finish(
    slots: dict[str, EngineSlot],
    judges: Judges,
    view: CompareView,
    messages: dict[str, list[Message]],
    params: SamplingParams,
    note: str = "",
) -> Iterator[CompareView]:
    sides = view.sides
    for key, side in sides.items():
        if not side.error:
            side.judged = judge_line(judges, messages[key], side.text)
    if any(side.error for side in sides.values()):  # the turn stays out of the conversation: resend it
        view.status = f"{note}  \n⚠ one side failed; nothing to vote on" if note else "⚠ one side failed; nothing to vote on"
        yield view
        return
    _keep_turn(view)
    view.status = "scoring divergence…"
    yield view
    blind = view.conversation.blind
    view.comparison = Comparison(
        prompt=messages["left"],
        left=_side(sides["left"], messages["left"]),
        right=_side(sides["right"], messages["right"]),
        params=params,
        roles=(sides["left"].role, sides["right"].role),
        scores={key: _score(slots, messages[key], side, params) for key, side in sides.items()},
        blind=blind,
        reveal=_named(sides) if blind else None,
    )
    view.divergence = dict(zip(SIDE_KEYS, view.comparison.divergence(), strict=True))
    view.status = f"{note}  \ndone: vote below" if note else "done: vote below"
    yield view


def _side(run: SideRun, messages: list[Message]) -> Side:
    return Side(run.model, run.backend, run.text, run.seed, context=list(messages))


def _named(sides: dict[str, SideRun]) -> tuple[str, str]:
    """What a blind battle shows after the vote: each side's stats line with its role and model."""
    left, right = (dataclasses.replace(sides[key], alias="").stats() for key in SIDE_KEYS)
    return left, right


def _score(slots: dict[str, EngineSlot], messages: Sequence[Message], side: SideRun, params: SamplingParams) -> ScoredAnswer:
    """``side``'s answer (and reasoning) scored under policy and reference, the same text under both."""
    title, note = f"{side.role} answer", measure_note(side.role, params, side.reasoning)
    try:
        policy = score_answer(slots["policy"].get(), messages, side.reasoning, side.text)
        reference = score_answer(slots["reference"].get(), messages, side.reasoning, side.text)
    except EngineError as exc:
        return ScoredAnswer(title, None, note, str(exc))
    return ScoredAnswer(title, align_tokens(policy, reference), note)
