"""The composition roots: every ``groundlabel`` verb and the training job's wiring, the only package that
imports the backend, the workers and the exporters together (the kernel names none of its functions).

Each verb module defines ``register(subparsers)``; verbs read the settings once
(:meth:`groundlabel.settings.Settings.from_env`) and pass them down.
"""
