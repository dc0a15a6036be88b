"""Gateways: third-party services a push job sends through (one module each), behind `base.Gateway`."""
