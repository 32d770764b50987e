"""A plugin that never returns."""


def forever():
    while True:
        pass
