"""Many untrusted plugin calls served through a pool of fresh sandboxes.

Every call runs in a WebAssembly guest of its own (``fresh=True``), so no
call sees what an earlier one left behind; ``warm=True`` starts each
slot's next guest while it waits, with the plugin already imported
(``preload``); ``packages=["markdown"]`` gives the guests the markdown
distribution installed here, read-only, with its extensions. The master
imports only its own ``plugin_host`` helper, never a plugin.

    python examples/plugin_pool.py
"""

import os
import sys
import time

from cpy2py import SandboxPool, TwinStartError, TwinTimeout

PLUGINS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins")


def main():
    sys.path.insert(0, PLUGINS)  # for plugin_host, the application's own module
    from plugin_host import call_plugin

    options = dict(paths=[PLUGINS], fresh=True, warm=True, timeout=2.0, packages=["markdown"])
    try:
        pool = SandboxPool(size=2, preload=["plugin_host", "markdown_page"], **options)
    except TwinStartError as err:  # the error says what is wrong (markdown not installed, say)
        print(f"cannot start the plugin pool: {err}")
        return
    with pool:
        requests = [(f"Order {n}", [("apples", n), ("pears", 2 * n)]) for n in range(1, 41)]
        started = time.perf_counter()
        pages = list(
            pool.map(
                call_plugin, ["markdown_page"] * len(requests), ["render"] * len(requests), *zip(*requests)
            )
        )
        elapsed = time.perf_counter() - started
        print(f"{len(pages)} pages rendered in fresh guests in {elapsed:.2f} s")
        print(pages[0]["html"].splitlines()[0], "...", "<table>" in pages[0]["html"] and "(a table)")
        print("plugin state each call saw:", sorted({page["rendered_in_this_guest"] for page in pages}))

        latencies = []
        for n in range(10):
            time.sleep(0.2)  # requests apart: each finds a guest started for it, markdown imported
            began = time.perf_counter()
            pool.execute(call_plugin, "markdown_page", "render", f"Single {n}", [("figs", n)])
            latencies.append((time.perf_counter() - began) * 1e3)
        latencies.sort()
        median = latencies[len(latencies) // 2]
        print(
            f"one request at a time: median {median:.1f} ms per call in a fresh guest "
            "(started, the plugin imported and markdown warmed up before the call came)"
        )

        try:
            pool.execute(call_plugin, "spin", "forever")
        except TwinTimeout as err:
            print(f"a runaway plugin was stopped: {err}")
        after = pool.execute(call_plugin, "markdown_page", "render", "After", [("plums", 3)])
        print("and the pool carries on:", after["html"].splitlines()[0])


if __name__ == "__main__":
    main()
