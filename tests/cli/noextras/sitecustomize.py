"""Loaded by every Python process of a test that puts this folder on PYTHONPATH: the packages named in
$MISGUARD_TEST_UNINSTALLED (comma-separated import names) look uninstalled, to `import` (ModuleNotFoundError) and to
importlib.util.find_spec (None) alike, as when pip never installed them."""
import os
import sys

for _name in filter(None, os.environ.get("MISGUARD_TEST_UNINSTALLED", "").split(",")):
    sys.modules[_name] = None
