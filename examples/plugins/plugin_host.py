"""The host application's own entry point into plugins, imported by both
sides: the master names ``call_plugin`` (so it never imports a plugin
itself), and the sandboxed guest runs it, importing the plugin there."""

import importlib


def call_plugin(plugin, function, *args):
    """``plugin.function(*args)``, run where this is called (in a guest)."""
    return getattr(importlib.import_module(plugin), function)(*args)
