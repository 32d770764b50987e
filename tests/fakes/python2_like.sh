#!/bin/sh
# Stand-in for a Python 2 interpreter where none is installed: runs the
# bootstrap under python3 with sys.version_info set to 2.7.18.
shift  # the -c
exec python3 -c 'import sys
sys.version_info = (2, 7, 18, "final", 0)
sys.version = "2.7.18 (stand-in)"
exec(sys.argv[1])' "$@"
