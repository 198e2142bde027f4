"""The Gradio app: chat, policy-vs-reference comparison with per-token divergence, votes, runs.

Pure logic (divergence maths, vote records, run folders, engine slots, stream handlers) lives in
modules that do not import Gradio, so it can be tested fast; the ``*_tab.py`` modules only lay
out components and wire them to those handlers.
"""
