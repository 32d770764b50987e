"""What a sandboxed guest may do with a master object it was handed.

The master hands a guest references, never its objects' insides. By default:

- a callable (function, method, lambda, an object with ``__call__``) can be
  called and nothing else: not one attribute of it is readable;
- any other object is opaque: the guest can pass it back and compare it by
  identity, nothing more;
- data (numbers, strings, bytes, containers of data) is copied.

An application that wants a guest to use an object says what it may use,
for one object with ``expose(obj, "read", "__len__")`` or for every instance
of a class with the ``@exposed("read", "__len__")`` decorator. Names are
public attribute names (read them; call them if they are methods) or
special methods of the data model from ``DATA_MODEL_METHODS``; attributes the
guest may also set or delete are listed in ``writable=``. Everything else
stays out of reach: private and dunder attributes, the class, globals,
modules, frames (docs/security.md, "Capabilities").
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, FrozenSet, Iterable, TypeVar

    C = TypeVar("C", bound=type)

#: special methods a guest may be granted on a master object (and that a
#: guest's own classes may have forwarded by their proxies in the master):
#: the data model's operations on values, nothing that reaches attributes,
#: classes, pickling, descriptors or coroutines
DATA_MODEL_METHODS: FrozenSet[str] = frozenset(
    """__call__ __len__ __length_hint__ __iter__ __next__ __reversed__ __getitem__ __setitem__
    __delitem__ __contains__ __bool__ __repr__ __str__ __bytes__ __format__ __hash__ __eq__ __ne__ __lt__
    __le__ __gt__ __ge__ __add__ __sub__ __mul__ __matmul__ __truediv__ __floordiv__ __mod__
    __divmod__ __pow__ __lshift__ __rshift__ __and__ __xor__ __or__ __radd__ __rsub__ __rmul__
    __rmatmul__ __rtruediv__ __rfloordiv__ __rmod__ __rdivmod__ __rpow__ __rlshift__ __rrshift__
    __rand__ __rxor__ __ror__ __iadd__ __isub__ __imul__ __imatmul__ __itruediv__ __ifloordiv__
    __imod__ __ipow__ __ilshift__ __irshift__ __iand__ __ixor__ __ior__ __neg__ __pos__ __abs__
    __invert__ __complex__ __int__ __float__ __index__ __round__ __trunc__ __floor__ __ceil__
    __enter__ __exit__""".split()
)


class Grant:
    """The names a guest may use on an object: ``names`` to read (and call),
    ``writable`` to set and delete. Immutable; ``|`` joins two grants."""

    __slots__ = ("names", "writable")

    def __init__(self, names: Iterable[str] = (), writable: Iterable[str] = ()) -> None:
        self.names: FrozenSet[str] = frozenset(_checked(n, "expose") for n in names)
        self.writable: FrozenSet[str] = frozenset(_checked(n, "writable", special=False) for n in writable)

    def __or__(self, other: Grant) -> Grant:
        joined = Grant.__new__(Grant)
        joined.names = self.names | other.names
        joined.writable = self.writable | other.writable
        return joined

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Grant) and (self.names, self.writable) == (other.names, other.writable)

    def __hash__(self) -> int:
        return hash((self.names, self.writable))

    def __repr__(self) -> str:
        return f"Grant(names={sorted(self.names)}, writable={sorted(self.writable)})"

    def allows_read(self, name: str) -> bool:
        return name in self.names and not _is_special(name)

    def allows_call(self, name: str) -> bool:
        return name in self.names

    def allows_write(self, name: str) -> bool:
        return name in self.writable


def _is_special(name: str) -> bool:
    return name[:2] == "__" and name[-2:] == "__"


def _checked(name: Any, what: str, special: bool = True) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise TypeError(f"{what}: attribute names are identifiers, not {name!r}")
    if _is_special(name):
        if special and name in DATA_MODEL_METHODS:
            return name
        allowed = "data model methods from cpy2py.capabilities.DATA_MODEL_METHODS" if special else "none"
        raise ValueError(
            f"{what}: {name!r} cannot be granted to a sandboxed guest (special names allowed: {allowed})"
        )
    if name.startswith("_"):
        raise ValueError(
            f"{what}: {name!r} is private; only public names can be granted to a sandboxed guest"
        )
    return name


#: what a handed callable may do: be called
CALL_ONLY = Grant(["__call__"])
#: what any other handed object may do unless the application says more
OPAQUE = Grant()


class Exposed:
    """``obj`` as handed to a sandboxed guest with a grant (made by ``expose``).

    Pass it to the guest in place of ``obj``; the guest gets a reference
    limited to the grant, and whatever the guest sends back is ``obj`` itself.
    """

    __slots__ = ("target", "grant")

    def __init__(self, target: Any, grant: Grant) -> None:
        self.target = target
        self.grant = grant

    def __repr__(self) -> str:
        return f"<cpy2py.Exposed {type(self.target).__qualname__} {sorted(self.grant.names)}>"


def expose(obj: Any, *names: str, writable: Iterable[str] = ()) -> Exposed:
    """``obj`` to hand to a sandboxed guest, which may use exactly ``names``
    of it (public attributes and methods, data model methods) and set or
    delete the attributes in ``writable``."""
    if isinstance(obj, Exposed):
        return Exposed(obj.target, obj.grant | Grant(names, writable))
    if type(obj) in _DATA_TYPES:
        raise TypeError(
            f"expose: a {type(obj).__name__} is data and reaches a guest as a copy; "
            "expose objects that must stay in the master"
        )
    return Exposed(obj, Grant(names, writable))


#: the exact types a guest receives as copies (docs/protocol.md, "Values")
_DATA_TYPES = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    list,
    tuple,
    dict,
    set,
    frozenset,
)


def exposed(*names: str, writable: Iterable[str] = ()) -> Callable[[C], C]:
    """Class decorator: every instance of the class (and of its subclasses)
    handed to a sandboxed guest may be used through ``names`` and ``writable``
    (joined with what a base class grants)."""
    grant = Grant(names, writable)

    def declare(cls: C) -> C:
        inherited = class_grant(cls)
        cls.__cpy2py_grant__ = grant if inherited is None else inherited | grant  # type: ignore[attr-defined]
        return cls

    return declare


def class_grant(cls: type) -> Any:
    """The grant declared by ``cls`` or a base class with ``@exposed``, or None."""
    found = getattr(cls, "__cpy2py_grant__", None)
    return found if isinstance(found, Grant) else None
