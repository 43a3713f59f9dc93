"""gRPC: the scheduler service over the real engine, the worker service, client and replay."""
