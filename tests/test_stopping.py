import pytest

from crsm_core.stopping import StopMatcher


def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, matched = matcher.push(piece)
        out.append(text)
        if matched:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@pytest.mark.parametrize("pieces, stops, expected, matched", [
    (["Hel", "lo\nUs", "er: x"], ["\nUser:"], "Hello", True),      # stop spans three pieces
    (["ab", "c"], ["abc", "b"], "a", True),                        # earliest match wins
    (["a\nU", "s", "e!"], ["\nUser:"], "a\nUse!", False),          # a near miss is released in full
    (["xyz"], [], "xyz", False),
    (["stop here"], ["stop"], "", True),
])
def test_stop_strings(pieces, stops, expected, matched):
    assert feed(StopMatcher(stops), pieces) == (expected, matched)


def test_only_a_possible_stop_prefix_is_held_back():
    m = StopMatcher(["END"])
    assert m.push("helloE") == ("hello", False)   # "E" may start "END"
    assert m.push("N") == ("", False)
    assert m.push("x") == ("ENx", False)          # not a stop after all: released at once
