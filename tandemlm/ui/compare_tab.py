"""Compare tab: one prompt, policy (left) and reference (right) streamed side by side, then where they diverge.

Both answers stream at once (one thread per side; the engines batch concurrent requests). When
both are done, each answer is scored under both models with ``token_logprobs`` and shown with
its tokens coloured by ``log π_policy − log π_ref``, next to the judges' verdicts. The finished
comparison is kept in a ``gr.State`` for the vote buttons (see ``vote_panel``).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tandemlm.deploy.types import Delta, SamplingParams
from tandemlm.errors import EngineError
from tandemlm.models.chat_template import Message
from tandemlm.ui.arena import ALIASES, assign_sides, build_leaderboard, same_model_note, side_seeds
from tandemlm.ui.chat_tab import chat_display, engine_messages, stats_line
from tandemlm.ui.divergence import LEGEND_HTML, align_tokens, divergence_html
from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.judges import Judges, judge_line
from tandemlm.ui.merge import DONE, merge_streams
from tandemlm.ui.sampling import sampling_controls, sampling_params
from tandemlm.ui.stopping import StopFlag
from tandemlm.ui.training_panel import build_training_panel
from tandemlm.ui.vote_panel import Comparison, build_vote_panel
from tandemlm.ui.votes import Side

if TYPE_CHECKING:
    from tandemlm.ui.models_panel import ModelsPanel

SIDES = {"left": "policy", "right": "reference"}  # which slot answers on which side (blind mode shuffles)
HIDDEN = "<div class='tandem-divergence'><i>Divergence hidden until you vote (blind battle).</i></div>"


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

    def bot(self) -> list[dict[str, Any]]:
        """Chatbot messages for this side (reasoning collapsible above the answer)."""
        return chat_display([{"role": "assistant", "content": self.text, "reasoning": self.reasoning}])

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
    """Everything the tab's outputs show."""

    sides: dict[str, SideRun] = field(default_factory=dict)
    divergence: dict[str, str] = field(default_factory=lambda: {"left": "", "right": ""})
    comparison: Comparison | None = None
    status: str = ""

    def values(self) -> tuple[Any, ...]:
        """Output values: left bot, right bot, left stats, right stats, left/right divergence, state, status."""
        left, right = self.sides.get("left"), self.sides.get("right")
        return (
            left.bot() if left else [],
            right.bot() if right else [],
            left.stats() if left else "",
            right.stats() if right else "",
            self.divergence["left"],
            self.divergence["right"],
            self.comparison,
            self.status,
        )


def compare_reply(
    slots: dict[str, EngineSlot],
    judges: Judges,
    prompt: str,
    system: str | None,
    *sampling: Any,
    stop: StopFlag | None = None,
    blind: bool = False,
    rng: random.Random | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Streams both answers to ``prompt``, then scores divergence; problems are shown, never raised.

    ``stop``, once set, ends both answers after their current tokens; a stopped comparison is not votable.
    ``blind`` shuffles the sides (``rng``) and hides who answered until the vote.
    """
    stop = stop or StopFlag()
    stop.arm()
    view = CompareView()
    text = (prompt or "").strip()
    if not text:
        view.status = "Type a prompt first."
        yield view.values()
        return
    try:
        params = sampling_params(*sampling)
    except EngineError as exc:
        view.status = f"⚠ {exc}"
        yield view.values()
        return
    messages = [*engine_messages([], system), {"role": "user", "content": text}]
    seeds = side_seeds(params.seed, rng)
    view.sides = {
        key: SideRun(role, slots[role].model, alias=ALIASES[key] if blind else "", seed=seeds[key])
        for key, role in assign_sides(blind, rng).items()
    }
    note = same_model_note(slots)
    view.status = f"{note}  \ngenerating…" if note else "generating…"
    started = time.perf_counter()
    merged = merge_streams(_start(slots, view.sides, messages, params))
    yield view.values()
    try:
        for batch in merged:
            _fold(view.sides, batch, time.perf_counter() - started)
            if stop.stopped:
                for side in view.sides.values():
                    side.finish = side.finish or "stopped"
                view.status = "stopped: nothing to vote on"
                yield view.values()
                return
            yield view.values()
    finally:
        merged.close()  # stops both streams and frees the engines' slots
    yield from _finish(slots, judges, view, messages, params, note)


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
    slots: dict[str, EngineSlot], sides: dict[str, SideRun], messages: list[Message], params: SamplingParams
) -> dict[str, Iterator[Delta]]:
    streams = {}
    for key, side in sides.items():
        try:
            engine = slots[side.role].get()
            side.backend = engine.info.backend
            streams[key] = engine.chat(messages, dataclasses.replace(params, seed=side.seed))
        except EngineError as exc:  # load failure or a prompt over the context length
            side.error = str(exc)
    return streams


def _finish(
    slots: dict[str, EngineSlot],
    judges: Judges,
    view: CompareView,
    messages: list[Message],
    params: SamplingParams,
    note: str = "",
) -> Iterator[tuple[Any, ...]]:
    sides = view.sides
    ok = all(not s.error for s in sides.values())
    for side in sides.values():
        if not side.error:
            side.judged = judge_line(judges, messages, side.text)
    if ok:
        view.comparison = Comparison(
            prompt=messages,
            left=_side(sides["left"]),
            right=_side(sides["right"]),
            params=params,
            roles=(sides["left"].role, sides["right"].role),
        )
        view.status = "scoring divergence…"
        yield view.values()
    for key, side in sides.items():
        view.divergence[key] = _divergence(slots, messages, side) if ok else ""
    blind = any(side.alias for side in sides.values())
    if blind and view.comparison is not None:
        view.comparison.reveal = _revealed(view)
        view.divergence = {"left": HIDDEN, "right": HIDDEN}
    view.status = "done: vote below" if ok else "⚠ one side failed; nothing to vote on"
    view.status = f"{note}  \n{view.status}" if note else view.status
    yield view.values()


def _side(run: SideRun) -> Side:
    return Side(run.model, run.backend, run.text, run.seed)


def _revealed(view: CompareView) -> tuple[str, str, str, str]:
    """What a blind battle shows after the vote: the named stats lines and the divergence of each side."""
    named = {key: dataclasses.replace(side, alias="") for key, side in view.sides.items()}
    return named["left"].stats(), named["right"].stats(), view.divergence["left"], view.divergence["right"]


def _divergence(slots: dict[str, EngineSlot], messages: Sequence[Message], side: SideRun) -> str:
    title = f"{side.role} answer"
    try:
        policy = slots["policy"].get().token_logprobs(messages, side.text)
        reference = slots["reference"].get().token_logprobs(messages, side.text)
    except EngineError as exc:
        return f"<div>⚠ could not score the {title}: {exc}</div>"
    return divergence_html(align_tokens(policy, reference), title)


def build_compare_tab(
    slots: dict[str, EngineSlot], judges: Judges, votes_path: str, runs_dir: str = "runs", models: ModelsPanel | None = None
) -> None:
    """Lays out the Compare tab (prompt, two answers, divergence, votes, leaderboard, training); call inside ``gr.Tab``."""
    import gradio as gr

    note = gr.Markdown(lambda: same_model_note(slots), elem_id="compare-same-model")
    with gr.Row():
        prompt = gr.Textbox(
            placeholder="One prompt for both models (Enter runs)", show_label=False, lines=1, max_lines=8, scale=6,
            elem_id="compare-input",
        )
        blind = gr.Checkbox(False, label="blind battle", info="sides shuffled, names hidden until the vote",
                            scale=1, min_width=140, elem_id="compare-blind")
        run = gr.Button("Compare", variant="primary", scale=1, min_width=100, elem_id="compare-run")
        stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="compare-stop")
    with gr.Accordion("system prompt and sampling", open=False):
        system = gr.Textbox(label="system prompt", lines=2, placeholder="optional")
        with gr.Row():
            controls = sampling_controls("compare")
    status = gr.Markdown(elem_id="compare-status")
    bots, stats, diverge = {}, {}, {}
    with gr.Row(equal_height=False):
        for key in SIDES:
            with gr.Column():
                bots[key] = gr.Chatbot(label=f"{key} answer", height=300, elem_id=f"compare-{key}-bot", buttons=["copy"])
                stats[key] = gr.Markdown(elem_id=f"compare-{key}-stats")
                diverge[key] = gr.HTML(elem_id=f"compare-{key}-divergence")
    gr.HTML(LEGEND_HTML)
    comparison = gr.State(None)
    flag = gr.State(StopFlag)  # a callable: one flag per browser session
    reveal = [stats["left"], stats["right"], diverge["left"], diverge["right"]]
    vote_outputs, vote_events = build_vote_panel(comparison, votes_path, reveal)
    refresh_board, board_outputs = build_leaderboard(votes_path)
    for event in vote_events:
        event.then(refresh_board, outputs=board_outputs, show_progress="hidden")
    if models is not None:
        build_training_panel(slots, votes_path, runs_dir, models)

    def reply(stop_flag: StopFlag, blind_battle: bool, text: str, system_prompt: str, *sampling: Any) -> Iterator[tuple[Any, ...]]:
        yield from compare_reply(slots, judges, text, system_prompt, *sampling, stop=stop_flag, blind=blind_battle)

    outputs = [bots["left"], bots["right"], stats["left"], stats["right"], diverge["left"], diverge["right"],
               comparison, status]
    for trigger in (run.click, prompt.submit):
        trigger(reply, [flag, blind, prompt, system, *controls], outputs, show_progress="hidden", concurrency_limit=8)
        trigger(lambda: ("", "", same_model_note(slots)), outputs=[*vote_outputs, note], queue=False)
    stop.click(lambda stop_flag: stop_flag.stop(), flag, None, queue=False)
