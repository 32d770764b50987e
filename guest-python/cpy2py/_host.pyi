"""The compiled part of cpy2py (host/src/python/, Rust): types for checkers.

The kernel uses ``NativeTwin`` and ``WasiGuest`` (through wasi.GuestTransport)
as transports of a link (protocol/transport.py, ``Transport``). The
``WASI_DEFAULT_*`` numbers are the one source of the sandbox defaults.
"""

from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

PROTOCOL_VERSION: int
TWIN_READ_FD: int
TWIN_WRITE_FD: int
WASI_DEFAULT_MEMORY_LIMIT: int
WASI_DEFAULT_TIMEOUT: float
WASI_DEFAULT_MAX_FRAME: int
WASI_DEFAULT_OUTPUT_LIMIT: int
WASI_STDLIB_MOUNT: str
WASMTIME_VERSION: str

_Buffer = Union[bytes, bytearray, memoryview]

# -- the codec (host/src/python/codec.rs) -----------------------------------------

def dumps(
    obj: Any,
    default: Optional[Callable[[Any], Tuple[int, Any]]] = None,
    *,
    parts: bool = False,
    plain: bool = False,
) -> Union[bytes, Tuple[bytes, ...]]: ...
def loads(
    data: Union[_Buffer, Frame],
    tag_hook: Optional[Callable[[int, Any], Any]] = None,
    budget: Optional[int] = None,
) -> Any: ...
def peek(frame: Union[bytes, bytearray, Frame]) -> Tuple[Optional[int], Optional[int], Optional[int]]: ...

# -- the protocol model (host/src/python/spec.rs; for tests) ----------------------

def check_frame(
    frame: bytes,
    stage: Literal["hello", "welcome", "answer", "message"],
    sender: Literal["master", "twin"],
    link: Literal["trusted", "sandboxed"] = "trusted",
) -> str: ...

# -- native twins (host/src/python/twin.rs) --------------------------------------

def init_logging(level: str) -> None: ...
def kill_all_twins() -> None: ...
def wait_out_of_host(timeout: float) -> bool: ...
def hold_signals() -> bool: ...
def release_signals() -> None: ...
def signals_held() -> bool: ...

class Frame:
    """A large frame received from a native twin, read in place by the codec."""

    def __len__(self) -> int: ...
    def __bytes__(self) -> bytes: ...

def read_frame(fd: int, first: bytes, length: int) -> Frame: ...

class NativeTwin:
    @staticmethod
    def spawn(
        executable: str,
        args: Sequence[str],
        env: Sequence[Tuple[str, str]],
        cwd: Optional[str] = None,
        handshake_timeout: float = 60.0,
        max_frame: int = ...,
        protocol_on_stdio: bool = False,
        preamble: Optional[bytes] = None,
    ) -> NativeTwin: ...
    @property
    def pid(self) -> int: ...
    @property
    def hello(self) -> Dict[str, Any]: ...
    @property
    def cut_mid_frame(self) -> bool: ...
    sends_parts: bool
    sends_now: bool
    runs_peer: bool
    stops_for_signals: bool
    plain_blocks: bool
    def send(self, payload: Union[bytes, Tuple[bytes, ...]]) -> None: ...
    def send_now(self, payload: bytes) -> bool: ...
    def try_send(self, payload: bytes, timeout: float) -> bool: ...
    def recv(self) -> Union[bytes, Frame, None, Literal[False]]: ...
    def fileno(self) -> int: ...
    def buffered(self) -> bool: ...
    def wait_readable(self, timeout: Optional[float] = None) -> bool: ...
    def exit_status(self) -> Optional[str]: ...
    def wait(self, timeout: float) -> Optional[str]: ...
    def kill(self) -> str: ...
    def close(self) -> None: ...
    def stderr_tail(self) -> str: ...
    def stderr_forwarded(self, timeout: float) -> bool: ...

# -- sandboxed twins (host/src/python/wasi.rs) --------------------------------------

def forget_compiled_guest(guest_file: str, cache_dir: Optional[str] = None) -> None: ...

class WasiGuest:
    @staticmethod
    def start(
        twin_id: str,
        guest_file: str,
        stdlib_dir: str,
        bundled_dir: Optional[str] = None,
        kernel_dir: Optional[str] = None,
        paths: List[str] = ...,
        packages: List[Tuple[str, List[str]]] = ...,
        packages_stamp: str = ...,
        pycache_dir: Optional[str] = None,
        memory_limit: int = ...,
        timeout: Optional[float] = ...,
        max_frame: int = ...,
        output_limit: int = ...,
        cache_dir: Optional[str] = None,
        handshake_timeout: float = 60.0,
    ) -> WasiGuest: ...
    @staticmethod
    def snapshot(
        twin_id: str,
        guest_file: str,
        stdlib_dir: str,
        modules: List[str],
        out: str,
        bundled_dir: Optional[str] = None,
        kernel_dir: Optional[str] = None,
        paths: List[str] = ...,
        packages: List[Tuple[str, List[str]]] = ...,
        packages_stamp: str = ...,
        pycache_dir: Optional[str] = None,
        memory_limit: int = ...,
        timeout: Optional[float] = ...,
        output_limit: int = ...,
        cache_dir: Optional[str] = None,
    ) -> None: ...
    @property
    def pid(self) -> int: ...
    @property
    def hello(self) -> Dict[str, Any]: ...
    @property
    def readable_fd(self) -> int: ...
    def send(self, payload: bytes) -> None: ...
    def queue(self, payload: bytes) -> None: ...
    def drive_for(self, limit: float) -> bool: ...
    def try_recv(self) -> Union[bytes, None, Literal[False]]: ...
    def recv(self) -> Optional[bytes]: ...
    def has_frames(self) -> bool: ...
    def exit_status(self) -> Optional[str]: ...
    def wait(self, timeout: float) -> Optional[str]: ...
    def kill(self) -> str: ...
    def stderr_tail(self) -> str: ...
    def end_error(self) -> Optional[BaseException]: ...
