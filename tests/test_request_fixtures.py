"""The project's request fixtures (tests/fixtures/requests) against the captures they stand for.

No servers: these read files. The replays themselves are test_fixture_replay.py (Responses) and
test_messages.py (Claude Code). See request_fixtures.py for the two sources and
MLXGW_SHARED_FIXTURES.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from request_fixtures import (
    CAPTURED_SHAPES,
    CLAUDE_CODE,
    PROJECT_FIXTURES,
    RESPONSES,
    SHAPES,
    captures_missing,
    load,
    request_files,
    shapes_of,
)

APIS = list(SHAPES)


def needs_captures(api: str):
    reason = captures_missing(api)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


def strings(value: Any) -> Iterator[str]:
    """Every string value (not keys) in a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)


@pytest.mark.parametrize("api", APIS)
def test_the_project_fixtures_hold_every_captured_shape(api):
    """Every shape the captures have (captured-shapes.json) is in some project fixture, so a
    clone without the captures still sends it."""
    listed = set(json.loads(CAPTURED_SHAPES.read_text())[api])
    missing = listed - set(shapes_of(api, "project"))
    assert not missing, f"shapes only the captures have: add a fixture under {PROJECT_FIXTURES / api}: {sorted(missing)}"


@pytest.mark.parametrize("api", [pytest.param(api, marks=needs_captures(api)) for api in APIS])
def test_the_captured_shapes_list_is_current(api):
    assert request_files(api, "captures"), "no captures"  # on CI, where they must be there
    captured = shapes_of(api, "captures")
    new = {shape: sorted(files)[:3] for shape, files in captured.items()
           if shape not in json.loads(CAPTURED_SHAPES.read_text())[api]}
    assert not new, (f"the captures have shapes {CAPTURED_SHAPES.name} does not list (regenerate it with "
                     f"`python tests/request_fixtures.py`, and cover them with project fixtures): {new}")


@pytest.mark.parametrize("api", [pytest.param(api, marks=needs_captures(api)) for api in APIS])
def test_no_capture_text_in_the_project_fixtures(api):
    """Our fixtures are our own words: no prose (a value with a space, 16 characters or more)
    that appears in a capture, where other vendors' prompts and tool descriptions are."""
    assert request_files(api, "captures"), "no captures"  # on CI, where they must be there
    captured = "\0".join(s for a in APIS for path in request_files(a, "captures") for s in strings(load(path)))
    copied = {path.name: s for path in request_files(api, "project") for s in strings(load(path))
              if len(s) >= 16 and any(c.isspace() for c in s) and s in captured}
    assert not copied, copied


def test_responses_chains_are_marked_with_needs():
    """A fixture that uses an earlier one's mock ids (previous_response_id, item_reference, an
    echoed output item, a GET path) says so in ``needs``, and only then; ids are never reused."""
    made: dict[str, str] = {}  # a mock id -> the number of the file whose mock reply made it
    for path in request_files(RESPONSES, "project"):
        request = load(path)
        number = path.name.split("-")[0]
        used = {made[s] for s in strings([request.get("body"), request["path"]]) if s in made}
        used |= {n for mock_id, n in made.items() if mock_id in request["path"]}
        assert used == set(request.get("needs") or []), f"{path.name}: uses the ids of {sorted(used)}"
        reply = request.get("mock_reply") or {}
        output = (reply.get("response") or {}).get("output") or reply.get("output") or []
        for mock_id in [(reply.get("response") or {}).get("id"), *(item.get("id") for item in output)]:
            if mock_id:
                assert mock_id not in made, f"{path.name}: {mock_id} reused"
                made[mock_id] = number


@pytest.mark.parametrize("api", APIS)
def test_every_project_fixture_is_described(api):
    readme = (PROJECT_FIXTURES / "README.md").read_text()
    files = request_files(api, "project")
    assert files
    for path in files:
        request = load(path)
        assert request.get("note") and request["method"] in ("GET", "POST") and "headers" in request, path.name
        assert path.name in readme, f"{path.name} is not in {PROJECT_FIXTURES / 'README.md'}"
        if api == CLAUDE_CODE and "count_tokens" not in request["path"]:
            assert (request.get("mock_reply") or {}).get("content"), f"{path.name}: no mock_reply.content"
