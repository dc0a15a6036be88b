"""pushd: a real-time push server. WebSocket clients subscribe to topics; messages PUBLISHed to Redis reach them."""

__version__ = "0.1.0"
