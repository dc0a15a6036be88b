"""Mass push jobs: audiences of recipients in Redis, and (later) jobs that send to them through gateways."""
