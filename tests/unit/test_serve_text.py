"""Streamed text deltas: stop strings cut as OpenAI does, incomplete characters held back."""
from __future__ import annotations

from specmesh.cluster.serve_text import IncrementalText

# A fake tokenizer: token i is the character chr(i); 0 decodes as an incomplete character.
def decode(ids):
    return "".join("\ufffd" if i == 0 else chr(i) for i in ids)


def ids(text):
    return [ord(c) for c in text]


def _stream(text_pieces, stop):
    inc = IncrementalText(decode, stop)
    out, sent = [], []
    for piece in text_pieces:
        out.extend(ids(piece))
        sent.append(inc.push(out))
    sent.append(inc.finish(out))
    return sent


def test_without_stop_strings_every_round_is_sent_at_once():
    assert _stream(["ab", "cd", "e"], ()) == ["ab", "cd", "e", ""]


def test_a_possible_stop_prefix_is_held_back_until_resolved():
    # "EN" could start "END": held back; the next round shows it does not.
    assert _stream(["abEN", "Xy"], ("END",)) == ["ab", "EN", "Xy"]


def test_the_stop_string_and_what_follows_are_never_sent():
    pieces = ["hello E", "NDtail"]
    sent = _stream(pieces, ("END",))
    assert "".join(sent) == "hello " and all("E" not in s for s in sent)


def test_the_earliest_of_several_stop_strings_wins():
    assert "".join(_stream(["a--b##c"], ("##", "--"))) == "a"


def test_a_trailing_incomplete_character_waits_for_the_next_round():
    inc = IncrementalText(decode)
    assert inc.push([ord("a"), 0]) == "a"
    assert inc.push([ord("a"), ord("é")]) == "é"  # the bytes completed into a character
    assert inc.finish([ord("a"), ord("é")]) == ""


def test_full_text_cuts_at_the_stop_string():
    assert IncrementalText(decode, ("x",)).full(ids("abxcd")) == "ab"


def test_no_tokenizer_means_no_text():
    inc = IncrementalText(None, ())
    assert inc.push([1, 2]) == "" and inc.finish([1, 2]) == ""
