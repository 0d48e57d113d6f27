"""What every API family shares: the one internal request (``request.py``) and its ``Generate``,
each family's description (``family.py``), submitting it and the event loop every reply runs (``generation.py``),
failures and their rendering (``errors.py``), structured output and tool schemas."""
