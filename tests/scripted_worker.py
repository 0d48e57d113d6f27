"""``python tests/scripted_worker.py <worker args>``: the real worker, plus scripted output.

A request whose last user message is "SCRIPT:<text>" makes the model write <text> (see
tiny_model.scripted_logits_processors); every other request is served normally.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_model import scripted_logits_processors  # noqa: E402

from worker.cli import main  # noqa: E402

sys.exit(main(make_logits_processors=scripted_logits_processors))
