"""Entry point of the cpy2py WASI guest (the componentize-py app module).

componentize-py runs this module while it builds the component and snapshots
the result (pre-initialization), so everything imported here is already in
memory when a guest starts. At run time the host calls ``wasi:cli/run``, and
``Run.run`` serves the master over the ``link`` import until it closes.

Besides the kernel's own imports, standard library modules that packages
commonly import at their own import are imported here too (``pathlib``,
``shutil``, ``tempfile``, ``importlib.resources``, ``html.parser``,
``xml.etree.ElementTree``, ``calendar``): each otherwise costs every guest
that imports it 1-13 ms (markdown and python-dateutil import all of them).
All guests share their pages; an idle guest touches about 30 pages more
for them. None of them keeps per-process state made at import:
``tempfile`` makes its random name sequence at first use (in the guest),
and componentize-py seeds ``random`` at each guest's first call.

Left out on purpose: modules whose import records something that must be
the guest's own: ``logging`` (its start time, from which each record's
``relativeCreated`` counts), ``zoneinfo`` and ``sysconfig`` (read from the
environment at import).
"""

# ruff: noqa: F401  (imports made for the snapshot)
import abc
import base64
import bisect
import calendar
import collections
import contextlib
import copy
import dataclasses
import datetime
import decimal
import enum
import fractions
import functools
import gc
import heapq
import html.parser
import importlib.resources
import importlib.util
import inspect
import io
import itertools
import json
import math
import numbers
import operator
import pathlib
import platform
import re
import shutil
import string
import struct
import tempfile
import textwrap
import time
import traceback
import types
import typing
import warnings
import weakref
import xml.etree.ElementTree

import cpy2py
import wit_world
import wit_world.exports
from componentize_py_types import Err
from cpy2py.kernel import guest_main, snapshot_heap
from cpy2py.protocol import codec_py
from wit_world.imports import link

# the call path run before the snapshot: every guest's first call starts warm
guest_main.warm_up()


class Run(wit_world.exports.Run):
    def run(self) -> None:
        guest_main.main(link)


class WitWorld(wit_world.WitWorld):
    def preload(self, modules: list[str]) -> None:
        """Only for a snapshot of the guest (host/src/wasm/snapshot.rs)."""
        try:
            guest_main.preload(modules, link)
        except BaseException as failure:  # the master reports it as a failed start
            raise Err(guest_main.describe_failure(failure)) from None

    def immortal_objects(self) -> tuple[int, bytes]:
        """Only for a snapshot of the guest, as its last work
        (cpy2py/kernel/snapshot_heap.py)."""
        objects = snapshot_heap.immortal_objects()
        snapshot_heap.settle()
        return objects


# what the build made stays as it is in the snapshot: the collector leaves it
# alone, so no guest's collection writes to (and so copies) the pages of it
# that all guests share; and a guest's new objects come from memory of their
# own, not from free blocks spread over those pages (cpy2py/kernel/snapshot_heap.py)
gc.collect()
snapshot_heap.settle()
