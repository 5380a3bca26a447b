"""The SSE decoder against the standard's parsing rules, fed whole and in every possible split."""
from __future__ import annotations

import random

import pytest

from clients.sse import SSEDecoder, SSEError, SSEMessage


def decode(stream: bytes, splits: list[int] | None = None) -> list[SSEMessage]:
    """Feeds `stream` cut at the given offsets (whole when None), then closes."""
    decoder = SSEDecoder()
    cuts = [0, *(splits or []), len(stream)]
    messages: list[SSEMessage] = []
    for start, end in zip(cuts, cuts[1:]):
        messages += decoder.feed(stream[start:end])
    return messages + decoder.close()


def msg(data: str, event: str = "message", id: str = "") -> SSEMessage:
    return SSEMessage(event=event, data=data, id=id)


def test_plain_event_has_default_type():
    assert decode(b"data: hello\n\n") == [msg("hello")]


def test_named_event_and_json_data():
    stream = b'event: token\ndata: {"text": "a", "token_id": 97}\n\n'
    assert decode(stream) == [msg('{"text": "a", "token_id": 97}', event="token")]


def test_multiline_data_joined_with_lf():
    assert decode(b"data: one\ndata: two\ndata:\ndata: four\n\n") == [msg("one\ntwo\n\nfour")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending(eol):
    stream = eol.join([b"event: e", b"data: x", b"data: y", b"", b"data: z", b"", b""])
    assert decode(stream) == [msg("x\ny", event="e"), msg("z")]


def test_mixed_line_endings():
    stream = b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\r\r"
    assert decode(stream) == [msg("a\nb\nc"), msg("d")]


def test_cr_lf_split_across_chunks_is_one_line_ending():
    stream = b"data: a\r\n\r\ndata: b\r\n\r\n"
    whole = decode(stream)
    assert whole == [msg("a"), msg("b")]
    for cut in range(len(stream) + 1):
        assert decode(stream, [cut]) == whole, cut


def test_cr_then_cr_is_two_line_endings():
    # "data: a" CR | CR: the second CR is a blank line (dispatch), not part of a CRLF
    assert decode(b"data: a\r", ) == []
    assert decode(b"data: a\r\r") == [msg("a")]
    assert decode(b"data: a\r\r", [8]) == [msg("a")]


def test_comments_are_ignored():
    stream = b": ping\n:\ndata: x\n: another comment\n\n: keep-alive\n\n"
    assert decode(stream) == [msg("x")]


def test_only_one_leading_space_is_dropped():
    assert decode(b"data:x\n\n") == [msg("x")]
    assert decode(b"data:  x \n\n") == [msg(" x ")]
    assert decode(b"data:\tx\n\n") == [msg("\tx")]


def test_field_without_colon_has_empty_value():
    assert decode(b"data\n\n") == [msg("")]
    assert decode(b"data\ndata\n\n") == [msg("\n")]
    # `event` with no value leaves the default type
    assert decode(b"event\ndata: x\n\n") == [msg("x")]


def test_colon_in_value_is_kept():
    assert decode(b"data: a:b: c\n\n") == [msg("a:b: c")]


def test_unknown_fields_are_ignored():
    assert decode(b"foo: bar\nDATA: no\ndata : no\ndata: yes\n\n") == [msg("yes")]


def test_event_without_data_is_not_dispatched_and_its_type_does_not_leak():
    assert decode(b"event: lonely\n\ndata: x\n\n") == [msg("x")]


def test_unterminated_message_at_end_of_stream_is_dropped():
    assert decode(b"data: complete\n\ndata: cut") == [msg("complete")]
    assert decode(b"data: complete\n\ndata: cut\n") == [msg("complete")]


def test_id_persists_and_resets():
    stream = (b"id: 1\ndata: a\n\n"
              b"data: b\n\n"          # keeps the last id
              b"id: 7\n\n"            # an id with no data still updates it
              b"data: c\n\n"
              b"id\ndata: d\n\n")     # empty id resets it
    assert decode(stream) == [msg("a", id="1"), msg("b", id="1"), msg("c", id="7"), msg("d", id="")]


def test_id_with_nul_is_ignored():
    assert decode(b"id: 3\ndata: a\n\nid: 4\x005\ndata: b\n\n") == [msg("a", id="3"), msg("b", id="3")]


def test_retry_sets_reconnection_time_only_when_all_digits():
    decoder = SSEDecoder()
    decoder.feed(b"retry: 1500\ndata: a\n\n")
    assert decoder.retry_ms == 1500
    for bad in (b"retry: 15x\n\n", b"retry: -1\n\n", b"retry: 1.5\n\n", b"retry:\n\n",
                "retry: \u0661\u0662\n\n".encode()):   # Arabic-Indic digits are not ASCII digits
        decoder.feed(bad)
        assert decoder.retry_ms == 1500, bad
    decoder.feed(b"retry: 20\n\n")
    assert decoder.retry_ms == 20


def test_bom_is_dropped_only_at_start():
    bom = "\ufeff".encode()
    assert decode(bom + b"data: a\n\n") == [msg("a")]
    assert decode(bom + b"data: a\n\n", [1]) == [msg("a")]   # cut inside the BOM's bytes
    # a BOM later is an ordinary character: here it makes the field name unknown
    assert decode(b"data: a\n\n" + bom + b"data: b\n\n") == [msg("a")]


def test_utf8_split_inside_a_character():
    text = "data: h\u00e9llo \u2713 \U0001f600\n\n".encode()
    for cut in range(len(text) + 1):
        assert decode(text, [cut]) == [msg("h\u00e9llo \u2713 \U0001f600")], cut


def test_invalid_utf8_raises():
    with pytest.raises(SSEError):
        decode(b"data: \xff\xfe\n\n")


def test_stream_ending_inside_a_character_raises():
    with pytest.raises(SSEError):
        decode("data: \u2713".encode()[:-1])


def test_overlong_line_raises():
    decoder = SSEDecoder(max_line_chars=64)
    decoder.feed(b"data: " + b"x" * 50)
    with pytest.raises(SSEError):
        decoder.feed(b"x" * 50)
    with pytest.raises(SSEError):
        SSEDecoder(max_line_chars=64).feed(b"data: " + b"y" * 100 + b"\n\n")


def test_byte_by_byte_equals_whole():
    stream = (b": hello\r\nretry: 10\r\nid: 1\r\nevent: token\r\ndata: {\"a\": 1}\r\n\r\n"
              b"event: done\rdata: line1\rdata: line2\r\r"
              + "data: \u00fcber\n\n".encode())
    whole = decode(stream)
    assert len(whole) == 3
    assert decode(stream, list(range(1, len(stream)))) == whole


def _random_stream(rng: random.Random) -> tuple[bytes, list[SSEMessage]]:
    """A random well-formed stream and the messages it must decode to."""
    eols = [b"\n", b"\r\n", b"\r"]
    alphabet = "ab :\u00e9\u2713{}\"\t"
    out = bytearray()
    expected: list[SSEMessage] = []
    last_id = ""
    for _ in range(rng.randint(0, 8)):
        eol = rng.choice(eols)
        event = rng.choice(["", "token", "done", "injection"])
        lines = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
                 for _ in range(rng.randint(0, 3))]
        new_id = rng.choice([None, str(rng.randint(0, 99))])
        fields = [b"data: " + line.encode() for line in lines]   # their order matters
        others = [b": comment"] if rng.random() < 0.3 else []
        if event:
            others.append(b"event: " + event.encode())
        if new_id is not None:
            others.append(b"id: " + new_id.encode())
            last_id = new_id
        for other in others:   # the other fields may come anywhere among the data lines
            fields.insert(rng.randint(0, len(fields)), other)
        out += eol.join(fields) + eol + eol
        if lines:
            expected.append(SSEMessage(event=event or "message", data="\n".join(lines), id=last_id))
    return bytes(out), expected


def test_random_streams_split_at_random_points():
    rng = random.Random(1234)
    for _ in range(300):
        stream, expected = _random_stream(rng)
        inner = range(1, len(stream))
        splits = sorted(rng.sample(inner, k=min(len(inner), rng.randint(0, 12))))
        assert decode(stream, splits) == expected
