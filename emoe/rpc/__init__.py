"""gRPC: the scheduler service over the real engine, the worker service, client and replay.

The client API is ``emoe.rpc.client`` (``EmoeClient``, ``generate_request``); this package
imports nothing heavy itself, so ``emoe --help`` does not load grpc.
"""
