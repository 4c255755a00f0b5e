"""The commands that start a process and wire its parts: the only place a backend meets workers.

Each module defines one verb with ``register(subparsers)``. They read the settings once
(:meth:`groundlabel.settings.Settings.from_env`) and pass them down.
"""
