"""The workbench spine: run workspace, manifests, pinned base models, tracking, the `wb` CLI.

Stages meet only through what lives here (manifests, the workspace layout) and standard on-disk formats.
Nothing in this package imports torch at import time.
"""
