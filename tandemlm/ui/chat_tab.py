"""Chat tab: streaming multi-turn chat with the policy or reference model.

The conversation lives in a ``gr.State`` as plain turns (``role``, ``content`` and, for the
assistant, ``reasoning``); the Chatbot shows a view of it with reasoning as a collapsible
"thought". :func:`chat_reply` is the whole handler and needs no Gradio to test.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from tandemlm.deploy.engine import Engine
from tandemlm.errors import EngineError
from tandemlm.models.chat_template import Message
from tandemlm.ui.engines import EngineSlot
from tandemlm.ui.sampling_controls import sampling_controls, sampling_params
from tandemlm.ui.stopping import StopFlag

Turn = dict[str, str]
ChatUpdate = tuple[list[dict[str, Any]], list[Turn], str, str]
"""(chatbot messages, turns state, input box value, stats line)."""


def engine_messages(turns: Sequence[Turn], system: str | None) -> list[Message]:
    """The conversation as the engine sees it: system prompt first, reasoning left out."""
    head: list[Message] = [{"role": "system", "content": system.strip()}] if system and system.strip() else []
    return head + [{"role": t["role"], "content": t["content"]} for t in turns]


def chat_display(turns: Sequence[Turn], streaming: bool = False) -> list[dict[str, Any]]:
    """Chatbot messages for ``turns``; reasoning becomes a collapsible thought above its answer."""
    shown: list[dict[str, Any]] = []
    for index, turn in enumerate(turns):
        reasoning = turn.get("reasoning", "")
        if reasoning:
            thinking = streaming and index == len(turns) - 1 and not turn["content"]
            metadata = {"title": "Reasoning", "status": "pending" if thinking else "done"}
            shown.append({"role": "assistant", "content": reasoning, "metadata": metadata})
        if turn["content"] or turn["role"] == "user":
            shown.append({"role": turn["role"], "content": turn["content"]})
    return shown


def stats_line(tokens: int, elapsed: float, first_token: float | None, finish: str | None = None) -> str:
    """``12 tokens · 40.1 tokens/s · first token 0.21 s`` (plus ``· finished (stop)`` once done)."""
    rate = tokens / elapsed if elapsed > 0 else 0.0
    first = f" · first token {first_token:.2f} s" if first_token is not None else ""
    done = " · stopped" if finish == "stopped" else f" · finished ({finish})" if finish else ""
    return f"{tokens} tokens · {rate:.1f} tokens/s{first}{done}"


def chat_reply(
    get_engine: Callable[[], Engine],
    message: str,
    turns: list[Turn],
    system: str | None,
    *sampling: Any,
    stop: StopFlag | None = None,
) -> Iterator[ChatUpdate]:
    """Streams the reply to ``message``; every problem becomes a ⚠ line in the stats, never an exception.

    ``sampling`` are the controls' values (max tokens, temperature, top-p, top-k, seed). On an
    error the turns are unchanged and the message stays in the input box to be fixed and resent.
    ``stop``, once set, ends the reply after the current token (the partial answer is kept).
    """
    stop = stop or StopFlag()
    stop.arm()
    text = (message or "").strip()
    if not text:
        yield chat_display(turns), turns, message or "", "Type a message first."
        return
    user: Turn = {"role": "user", "content": text}
    try:
        params = sampling_params(*sampling)
        engine = get_engine()
        started = time.perf_counter()
        stream = engine.chat([*engine_messages(turns, system), user], params)
    except EngineError as exc:
        yield chat_display(turns), turns, message, f"⚠ {exc}"
        return
    reply: Turn = {"role": "assistant", "content": "", "reasoning": ""}
    new_turns = [*turns, user, reply]
    yield chat_display(new_turns, streaming=True), new_turns, "", "generating…"
    tokens, first_token, usage, finish = 0, None, None, None
    try:
        for delta in stream:
            if delta.text or delta.reasoning:
                tokens += 1
                first_token = first_token if first_token is not None else time.perf_counter() - started
            reply["content"] += delta.text
            reply["reasoning"] += delta.reasoning
            usage = delta.usage or usage
            finish = delta.finish_reason or finish
            if stop.stopped:
                finish = "stopped"
                break
            yield chat_display(new_turns, streaming=True), new_turns, "", stats_line(
                tokens, time.perf_counter() - started, first_token
            )
    except EngineError as exc:
        yield chat_display(new_turns), new_turns, "", f"⚠ {exc}"
        return
    finally:
        stream.close()  # cancels the engine request when stopped early (or when Gradio drops the event)
    count = usage.completion_tokens if usage else tokens
    yield chat_display(new_turns), new_turns, "", stats_line(count, time.perf_counter() - started, first_token, finish)


def build_chat_tab(slots: dict[str, EngineSlot]) -> None:
    """Lays out the Chat tab and wires its events; call inside ``gr.Blocks``/``gr.Tab``."""
    import gradio as gr

    turns = gr.State([])
    flag = gr.State(StopFlag)  # a callable: one flag per browser session
    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(label="conversation", height=460, elem_id="chat-bot", buttons=["copy"])
            with gr.Row():
                box = gr.Textbox(
                    placeholder="Message (Enter sends)", show_label=False, lines=1, max_lines=8, scale=6,
                    elem_id="chat-input",
                )
                send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="chat-send")
                stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="chat-stop")
            stats = gr.Markdown(elem_id="chat-stats")
        with gr.Column(scale=1, min_width=260):
            who = gr.Radio(["policy", "reference"], value="policy", label="chat with", elem_id="chat-who")
            system = gr.Textbox(label="system prompt", lines=3, placeholder="optional")
            with gr.Accordion("sampling", open=True):
                controls = sampling_controls("chat")
            clear = gr.Button("New conversation", elem_id="chat-clear")

    def reply(
        stop_flag: StopFlag, message: str, state: list[Turn], system_prompt: str, role: str, *sampling: Any
    ) -> Iterator[ChatUpdate]:
        yield from chat_reply(slots[role].get, message, state, system_prompt, *sampling, stop=stop_flag)

    inputs = [flag, box, turns, system, who, *controls]
    outputs = [chatbot, turns, box, stats]
    for trigger in (send.click, box.submit):
        trigger(reply, inputs, outputs, show_progress="hidden", concurrency_limit=8)
    stop.click(lambda stop_flag: stop_flag.stop(), flag, None, queue=False)
    clear.click(lambda: ([], [], ""), outputs=[chatbot, turns, stats], queue=False)
