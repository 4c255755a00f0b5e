"""The Label Studio ML backend: HTTP protocol, label-config reading, queue client, auth.

This package never imports torch: the backend image installs without the worker extras.
"""
