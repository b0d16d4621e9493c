from __future__ import annotations

from pylocalai.engine.textstream import TextAssembler


def feed_all(asm: TextAssembler, pieces: list[bytes]) -> str:
    return "".join(asm.feed(p) for p in pieces) + asm.flush()


def test_multibyte_character_split_across_tokens_is_held_until_complete() -> None:
    asm = TextAssembler()
    euro = "€".encode()  # 3 bytes
    assert asm.feed(b"a" + euro[:1]) == "a"
    assert asm.feed(euro[1:2]) == ""
    assert asm.feed(euro[2:] + b"b") == "€b"


def test_incomplete_character_at_end_becomes_replacement() -> None:
    asm = TextAssembler()
    assert asm.feed("é".encode()[:1]) == ""
    assert asm.flush() == "\ufffd"


def test_stop_string_spanning_tokens_is_cut_and_never_emitted() -> None:
    asm = TextAssembler(("</end>",))
    out = [asm.feed(p) for p in [b"hello </", b"en", b"d> tail"]]
    assert "".join(out) == "hello "
    assert asm.stopped_by == "</end>"
    assert all("</" not in o for o in out)


def test_partial_stop_prefix_is_released_when_it_diverges() -> None:
    asm = TextAssembler(("STOP",))
    assert asm.feed(b"ab ST") == "ab "
    assert asm.feed(b"AR") == "STAR"
    assert asm.stopped_by is None
    assert asm.flush() == ""


def test_earliest_of_several_stops_wins() -> None:
    asm = TextAssembler(("bb", "a"))
    assert feed_all(asm, [b"xxbba"]) == "xx"
    assert asm.stopped_by == "bb"


def test_held_prefix_is_flushed_at_end_of_generation() -> None:
    asm = TextAssembler(("###",))
    assert asm.feed(b"text #") == "text "
    assert asm.flush() == "#"


def test_stop_inside_multibyte_text() -> None:
    asm = TextAssembler(("ü",))
    u = "ü".encode()
    assert asm.feed(b"gr" + u[:1]) == "gr"
    assert asm.feed(u[1:] + b"n") == ""
    assert asm.stopped_by == "ü"
