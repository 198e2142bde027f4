"""The Gradio app: chat, policy-vs-reference comparison with per-token divergence, votes, runs.

``app`` builds the page: the Models panel (``models_panel`` over the two engine slots of
``engines``, whose references ``model_refs`` resolves) above the tabs. The Chat tab is ``chat_tab``;
the Compare tab, with its arena, divergence and vote panels, is the ``compare`` package; what the
votes become (preference records, the leaderboard's ratings, a DPO run) is the ``votes`` package;
the Runs tab is ``runs_tab`` over the run folders of ``runs``. ``sampling_controls`` and ``stopping``
serve Chat and Compare alike.

Pure logic (divergence maths, vote records, run folders, engine slots, stream handlers) lives in
modules that do not import Gradio, so it can be tested fast; the ``*_tab``, ``*_panel`` and
``layout`` modules lay out components and wire them to those handlers.
"""
