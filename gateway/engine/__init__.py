"""The gateway's side of the engine: the client routes (``client.py``) over the worker link
(``link.py``, the ROUTER socket) and the registry of workers (``registry.py``)."""
