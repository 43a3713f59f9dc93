"""The heart shared by the simulator and the server: plain Python and numpy only.

Nothing under emoe.core imports simpy, torch or grpc.
"""
