"""The original cpy2py's documented API, to the letter: every public name its
documentation gives is importable from the same place, and the details code
written for it relies on (keywords, where a twinfunction is a plain function)."""

from __future__ import annotations

import importlib

import pytest
import twin_functions as tf
import twin_helpers as th
from cpy2py import kernel_state
from support import SANDBOX_KIND, start_twin

#: the public names of the original documentation (quick guide, tutorial,
#: objects and functions pages, magic keys, debugging), where it puts them.
#: The environment variables __CPY2PY_TWIN_ID__ and __CPY2PY_MASTER_ID__ are
#: tested in test_twinmaster.py, CPY2PY_DEBUG and the '__cpy2py__' loggers in
#: test_faults.py.
ORIGINAL_NAMES = [
    "cpy2py.TwinMaster",
    "cpy2py.TwinMaster.start",
    "cpy2py.TwinMaster.execute",
    "cpy2py.TwinMaster.stop",
    "cpy2py.TwinMaster.destroy",
    "cpy2py.TwinObject",
    "cpy2py.TwinObject.__twin_id__",
    "cpy2py.twinfunction",
    "cpy2py.localmethod",
    "cpy2py.kernel_state",
    "cpy2py.kernel_state.TWIN_ID",
    "cpy2py.kernel_state.MASTER_ID",
    "cpy2py.kernel_state.is_twinterpreter",
    "cpy2py.kernel_state.is_master",
    "cpy2py.kernel_state.TWIN_GROUP_STATE",
    "cpy2py.kernel_state.TWIN_GROUP_STATE.add_initializer",
    "cpy2py.kernel_state.TWIN_GROUP_STATE.add_finalizer",
    "cpy2py.kernel_state.TwinGroupState",
    "cpy2py.proxy.proxy_object.TwinObject",
    "cpy2py.proxy.proxy_object.TwinObject.__is_twin_proxy__",
    "cpy2py.proxy.proxy_object.localmethod",
    "cpy2py.__version__",
]


def resolve(dotted: str) -> object:
    """The object a dotted name gives: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ImportError(dotted)


@pytest.mark.parametrize("dotted", ORIGINAL_NAMES)
def test_every_documented_name_is_where_the_original_documents_it(dotted):
    assert resolve(dotted) is not None


def test_the_old_import_path_gives_the_same_classes():
    import cpy2py
    from cpy2py.proxy.proxy_object import TwinObject, localmethod

    assert TwinObject is cpy2py.TwinObject and localmethod is cpy2py.localmethod
    assert TwinObject.__is_twin_proxy__ is False


@pytest.fixture(params=["python3", "pypy3", SANDBOX_KIND])
def started(request):
    master = start_twin(request.param)
    yield master
    master.stop()


def test_is_twinterpreter_takes_the_original_keyword(started):
    assert kernel_state.is_twinterpreter(kernel_id=kernel_state.MASTER_ID)
    assert not kernel_state.is_twinterpreter(kernel_id=started.twinterpreter_id)
    assert started.execute(kernel_state.is_twinterpreter, kernel_id=started.twinterpreter_id) is True
    assert started.execute(kernel_state.is_twinterpreter, kernel_id=kernel_state.MASTER_ID) is False


def test_a_twinfunction_is_the_plain_function_in_its_own_interpreter(started):
    own = {"python3": "in_python", "pypy3": "in_pypy", SANDBOX_KIND: "in_wasi"}[started.twinterpreter_id]
    there = started.execute(th.pinned_function, "twin_functions", own)
    assert there == {"wrapped": False, "twin_id": started.twinterpreter_id, "name": own}
    # elsewhere it is the wrapper, with the plain function as __wrapped__
    assert started.execute(th.pinned_function, "twin_functions", "in_master")["wrapped"] is True
    assert not hasattr(tf.in_master, "__wrapped__") and tf.in_master.__twin_id__ == kernel_state.MASTER_ID
    assert getattr(tf, own).__wrapped__.__name__ == own
    if started.twinterpreter_id != SANDBOX_KIND:  # a guest's functions reach the master as proxies
        # sent back by name, it is the wrapper here again, and runs there
        assert started.execute(th.own_function, "twin_functions", own) is getattr(tf, own)
