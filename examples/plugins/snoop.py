"""A plugin that tries to read what it was not given."""

import os


def steal(path):
    with open(path) as secret:
        return secret.read()


def environment():
    return dict(os.environ)
