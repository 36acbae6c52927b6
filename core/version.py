"""The installed misguard version, recorded in every manifest and judge card."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("misguard")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
