"""What a twin has loaded: the first call of tests/test_startup.py. Imports
nothing beyond ``sys``, so that it adds no module but itself."""

import sys


def loaded_modules() -> list:
    return sorted(sys.modules)


def twin_master_name() -> str:
    """``cpy2py.TwinMaster`` in a twin that started without cpy2py.master."""
    import cpy2py

    assert "TwinMaster" in dir(cpy2py)
    from cpy2py import TwinMaster

    assert cpy2py.TwinMaster is TwinMaster
    return TwinMaster.__name__


def twin_sees_itself_alive(twin_id: str) -> bool:
    from cpy2py import TwinMaster

    return TwinMaster(twinterpreter_id=twin_id).is_alive


def jit_hints() -> tuple:
    """After how many frames this twin's servers mark the kernel for PyPy's
    JIT (0: never, or done), and whether they did."""
    from cpy2py.kernel import connection

    return connection._JIT_HINTS_AT, connection._jit_hinted
