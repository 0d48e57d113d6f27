"""What every API family shares: the one internal request (``request.py``) and its ``Generate``,
each family's description (``family.py``), the event loop every stream runs (``events.py``),
failures and their rendering (``errors.py``), structured output and tool schemas."""
