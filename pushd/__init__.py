"""pushd: a real-time push server. WebSocket clients subscribe to topics; messages PUBLISHed to Redis reach them."""

from importlib import metadata

try:
    #: The installed distribution's version: setup.cfg is the one place it is written.
    __version__ = metadata.version("pushd")
except metadata.PackageNotFoundError:
    # Imported from a source tree that was never installed (PYTHONPATH=.): there is no version to report.
    __version__ = "0+unknown"
