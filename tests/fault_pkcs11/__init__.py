"""Fault-injecting PKCS#11 module for tests; the helpers live in faultmodule.py."""

from .faultmodule import *  # noqa: F401,F403
from .faultmodule import __all__  # noqa: F401
