"""The TCP link of a twin placed on a Ray cluster (``cpy2py/ray.py``): who
may connect, and how it proves it.

The node side listens for one connection from the master. Before a single
byte of protocol is read, both ends prove they hold the twin's secret, a
random key that only the master and the node's actor know (Ray hands it
over): a mutual challenge-response with HMAC-SHA256 over fresh nonces. A
peer that fails it, or says nothing within ``CHALLENGE_TIMEOUT``, is cut
off, and the node side logs it. Nothing the peer sends before that is
decoded: the twin process does not even exist yet.

    node   -> master:  MAGIC, nonce_n (32 bytes)
    master -> node:    HMAC(secret, "master" + nonce_n), nonce_m (32 bytes)
    node   -> master:  HMAC(secret, "twin" + nonce_m + nonce_n)

Runs in the master and in the Ray worker that hosts the twin; pure stdlib.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import time

MAGIC = b"cpy2py-tcp-1\n"
NONCE_SIZE = 32
DIGEST_SIZE = hashlib.sha256().digest_size
#: how long a connecting peer may take to answer the challenge
CHALLENGE_TIMEOUT = 10.0
#: a peer that is gone without a word (a node that lost power) is noticed in
#: about KEEPALIVE_IDLE + KEEPALIVE_COUNT * KEEPALIVE_INTERVAL seconds
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


class AuthenticationFailed(Exception):
    """The peer did not prove it holds the twin's secret."""


class CutOff(AuthenticationFailed):
    """The connection ended before the challenge did (the node may cut off
    its oldest challenges when crowded: the master tries again)."""


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def _read_exactly(sock: socket.socket, size: int, deadline: float) -> bytes:
    """``size`` bytes, all of them by ``deadline`` (monotonic): a peer that
    sends a byte now and then gets no more time than one that sends none."""
    data = b""
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout
        sock.settimeout(left)
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise CutOff(f"the peer closed the connection after {len(data)} of {size} bytes")
        data += chunk
    return data


def tune(sock: socket.socket) -> None:
    """No delay for small frames, and keepalive probes for a silent peer."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def challenge(sock: socket.socket, secret: bytes) -> None:
    """The node's side: raises ``AuthenticationFailed`` unless the peer
    answers the challenge; the peer's bytes are only compared, never parsed."""
    nonce = os.urandom(NONCE_SIZE)
    deadline = time.monotonic() + CHALLENGE_TIMEOUT
    sock.settimeout(CHALLENGE_TIMEOUT)
    try:
        sock.sendall(MAGIC + nonce)
        answer = _read_exactly(sock, DIGEST_SIZE + NONCE_SIZE, deadline)
        if not hmac.compare_digest(answer[:DIGEST_SIZE], _mac(secret, b"master", nonce)):
            raise AuthenticationFailed("its answer to the challenge is wrong (it does not hold the secret)")
        sock.sendall(_mac(secret, b"twin", answer[DIGEST_SIZE:], nonce))
    except socket.timeout:
        raise AuthenticationFailed(
            f"it did not answer the challenge within {CHALLENGE_TIMEOUT:g} s"
        ) from None
    except OSError as err:
        raise AuthenticationFailed(f"the connection failed during the challenge: {err}") from None
    sock.settimeout(None)


def prove(sock: socket.socket, secret: bytes, timeout: float) -> None:
    """The master's side: answer the node's challenge, and check that the
    node holds the secret too (else it is not the twin's actor)."""
    deadline = time.monotonic() + max(timeout, 0.001)
    sock.settimeout(max(timeout, 0.001))
    try:
        hello = _read_exactly(sock, len(MAGIC) + NONCE_SIZE, deadline)
        if not hmac.compare_digest(hello[: len(MAGIC)], MAGIC):
            raise AuthenticationFailed("it does not speak the cpy2py TCP link")
        nonce = os.urandom(NONCE_SIZE)
        sock.sendall(_mac(secret, b"master", hello[len(MAGIC) :]) + nonce)
        proof = _read_exactly(sock, DIGEST_SIZE, deadline)
        if not hmac.compare_digest(proof, _mac(secret, b"twin", nonce, hello[len(MAGIC) :])):
            raise AuthenticationFailed("it does not hold the twin's secret")
    except socket.timeout:
        raise AuthenticationFailed("it did not finish the challenge in time") from None
    except OSError as err:
        raise CutOff(f"the connection failed during the challenge: {err}") from None
    sock.settimeout(None)
