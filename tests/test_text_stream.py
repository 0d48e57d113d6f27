from worker.text_stream import StopStrings


def feed(stops, pieces):
    matcher = StopStrings(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.push(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_no_stops_passes_text_through():
    assert feed([], ["a", "b"]) == ("ab", False)


def test_stop_split_across_pieces_is_never_emitted():
    assert feed(["END"], ["hello E", "N", "D and more"]) == ("hello ", True)


def test_held_back_prefix_is_released_when_it_does_not_match():
    matcher = StopStrings(["END"])
    assert matcher.push("hello EN") == ("hello ", False)
    assert matcher.push("VY") == ("ENVY", False)


def test_earliest_of_several_stops_wins():
    assert feed(["world", "lo"], ["hello world"]) == ("hel", True)


def test_flush_releases_a_partial_match_at_the_end():
    assert feed(["\n\n"], ["line\n"]) == ("line\n", False)
