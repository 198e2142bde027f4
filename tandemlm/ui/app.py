"""The ``tandem ui`` app: a Models panel above four tabs (Chat, Compare, Runs), and its launch.

Models load lazily (in the background at launch, or on first use), so a model that fails to load
is an error line in the page, not a crash. Binds 127.0.0.1 with share off unless asked otherwise.
"""

from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tandemlm.deploy.load_options import LoadOptions
from tandemlm.models.builtin import DEFAULT_MODEL
from tandemlm.ui.compare.judges import Judges
from tandemlm.ui.engines import EnginePool, EngineSlot
from tandemlm.ui.model_refs import DEMO_POLICY
from tandemlm.ui.models_panel import panel_values, slots_status, warm_up

if TYPE_CHECKING:
    import gradio as gr

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")

# Fits a 1024×700 laptop screen (issue 14): the chat input on the first screen, long model paths on
# one line (they scroll sideways instead of pushing the panel down), the chat as tall as the screen allows.
UI_CSS = """
#models-panel textarea { white-space: pre; overflow-x: auto; }
#models-panel button { white-space: nowrap; }
#model-status :is(p, code) { font-size: var(--text-sm); line-height: 1.4; margin: 0; }
#chat-bot { height: clamp(220px, calc(100vh - 400px), 720px) !important; }
#runs-plots .thumbnail-item { aspect-ratio: auto; height: auto; }
"""


@dataclass
class UIConfig:
    """Settings of ``tandem ui``; each field mirrors a flag."""

    policy: str = field(
        default=DEMO_POLICY,
        metadata={"help": f"Policy model or alignment run folder (default {DEMO_POLICY}: the shipped PPO capitals LoRA on smollm2)."},
    )
    reference: str | None = field(default=None, metadata={"help": "Reference model (default: the built-in model)."})
    policy_backend: str = field(default="auto", metadata={"help": "Backend for the policy."})
    reference_backend: str = field(default="auto", metadata={"help": "Backend for the reference."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; 0.0.0.0 exposes the app."})
    port: int = field(default=7860, metadata={"help": "TCP port."})
    auth: str | None = field(default=None, metadata={"help": "user:pass required to open the app."})
    share: bool = field(default=False, metadata={"help": "Open a public Gradio share link."})
    votes: Path = field(default=Path("preferences.jsonl"), metadata={"help": "JSONL file votes are appended to."})
    runs_dir: Path = field(default=Path("runs"), metadata={"help": "Folder of alignment runs for the Runs tab."})
    n_ctx: int | None = field(default=None, metadata={"help": "llama.cpp context size."})
    n_threads: int | None = field(default=None, metadata={"help": "llama.cpp CPU threads (1 can beat all cores on a busy machine)."})
    n_gpu_layers: int | None = field(default=None, metadata={"help": "llama.cpp layers on the GPU (default: all on a GPU build)."})

    def __post_init__(self) -> None:
        if not self.policy or not self.policy.strip():
            raise ValueError("policy must name a model or run folder")
        self.reference = self.reference or DEFAULT_MODEL
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be between 1 and 65535, got {self.port}")
        if self.auth is not None:
            user, sep, password = self.auth.partition(":")
            if not sep or not user or not password:
                raise ValueError("auth must be user:pass with both parts non-empty")
        self.votes, self.runs_dir = Path(self.votes).expanduser(), Path(self.runs_dir).expanduser()
        if self.votes.is_dir():
            raise ValueError(f"votes must be a file, but {self.votes} is a folder")

    def credentials(self) -> tuple[str, str] | None:
        """``(user, password)`` from ``auth``, or None."""
        if not self.auth:
            return None
        user, _, password = self.auth.partition(":")
        return user, password


def make_slots(config: UIConfig, pool: EnginePool) -> dict[str, EngineSlot]:
    """The policy and reference slots (same model and backend share one engine through the pool)."""
    return {
        "policy": EngineSlot("policy", pool, config.policy, config.policy_backend),
        "reference": EngineSlot("reference", pool, config.reference or DEFAULT_MODEL, config.reference_backend),
    }


def create_app(config: UIConfig, slots: dict[str, EngineSlot], judges: Judges | None = None) -> gr.Blocks:
    """Builds the Blocks app around ``slots``; nothing is loaded here."""
    import gradio as gr

    from tandemlm.ui.chat_tab import build_chat_tab
    from tandemlm.ui.compare.layout import build_compare_tab
    from tandemlm.ui.models_panel import build_models_panel
    from tandemlm.ui.runs_tab import build_runs_tab

    with gr.Blocks(title="tandemlm", analytics_enabled=False) as demo:
        gr.Markdown("## tandemlm: chat, compare policy vs reference, vote")
        models = build_models_panel(slots)
        with gr.Tabs(selected="chat") as tabs:
            with gr.Tab("Chat", id="chat"):
                build_chat_tab(slots)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(slots, judges or Judges(), str(config.votes), str(config.runs_dir), models)
            with gr.Tab("Runs", id="runs"):
                build_runs_tab(slots, str(config.runs_dir), models, tabs)
        # A reload shows what the slots hold now, not the launch defaults (at once, before any load);
        # the warm-up follows it, so its status is the last word.
        demo.load(
            lambda: [*panel_values(slots), slots_status(slots)], outputs=[*models.fields, models.status], queue=False
        ).then(lambda: warm_up(slots), outputs=models.status)
    return demo


def launch(config: UIConfig, judges: Judges | None = None) -> None:
    """Starts loading the models in the background and serves the app until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home from a local tool
    pool = EnginePool(load_options=LoadOptions(n_ctx=config.n_ctx, n_threads=config.n_threads, n_gpu_layers=config.n_gpu_layers))
    slots = make_slots(config, pool)
    demo = create_app(config, slots, judges)
    threading.Thread(target=warm_up, args=(slots,), name="tandem-ui-warm-up", daemon=True).start()
    if config.host not in LOCAL_HOSTS and not config.auth:
        print(f"warning: the app on {config.host} is open to the network with no --auth", file=sys.stderr)
    allowed = [str(config.runs_dir.resolve())]  # run plots, also of runs that start after launch
    try:
        demo.queue(default_concurrency_limit=8).launch(
            server_name=config.host,
            server_port=config.port,
            share=config.share,
            auth=config.credentials(),
            allowed_paths=allowed,
            ssr_mode=False,
            css=UI_CSS,
            footer_links=["gradio", "settings"],
        )
    finally:
        pool.close()
