"""Stubs generated from protos/emoe/v1 by ``python -m emoe.rpc.protogen``; do not edit."""
