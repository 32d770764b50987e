"""A plugin that tries to read what it was not given."""

import os


def steal(path):
    with open(path) as secret:
        return secret.read()


def environment():
    return dict(os.environ)


def walk(callback):
    """Tries to walk from a callback it was handed to the master's globals."""
    return callback.__globals__["os"].environ


def peek(settings):
    """Reads what it was allowed to read, then what it was not."""
    allowed = settings.theme
    try:
        return allowed, settings.api_key
    except Exception as err:
        return allowed, f"refused: {type(err).__name__}"
