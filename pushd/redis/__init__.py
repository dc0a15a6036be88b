"""Everything pushd says to Redis: connections, the membership mirror, the PSUBSCRIBE listener, the embedded server."""
