"""LocalAgreement-2 and the word comparisons around it (transcriber/agreement.py)."""

from __future__ import annotations

from transcriber.agreement import LocalAgreement, common_prefix, drops_words


def test_local_agreement_promotes_the_agreed_prefix_only() -> None:
    la = LocalAgreement()
    assert la.update(["And", "so"]) == 0
    assert la.update(["and", "so,", "my"]) == 2  # case and punctuation do not matter
    assert la.update(["And", "so", "my", "fellow"]) == 3
    assert la.update(["And", "sew"]) == 3  # never shrinks
    assert la.update(["And", "so", "my", "fellow"], limit=2) == 3


def test_local_agreement_limit_holds_back_recent_words() -> None:
    la = LocalAgreement()
    la.update(["a", "b", "c"])
    assert la.update(["a", "b", "c"], limit=1) == 1


def test_words_that_differ_only_in_case_and_punctuation_agree() -> None:
    assert common_prefix(["And", "so,", "my"], ["and", "so", "our"]) == 2
    assert common_prefix([], ["a"]) == 0


def test_a_final_that_skips_a_run_of_the_words_its_partial_showed_is_spotted() -> None:
    """A run of two or more of the partial's words missing, with more of the partial after
    them: Whisper skipped a phrase; revisions, single words and the partial's cut-off last
    words are not."""
    shown = "ask what you can do for your".split()
    assert drops_words(shown, "Ask what do for your country.".split())
    assert drops_words(shown, "do for your country.".split())  # the first words skipped
    assert not drops_words(shown, "ask what you do your country".split())  # 1 and 1 apart
    assert not drops_words(shown, "Ask what you can do for your country.".split())
    assert not drops_words(shown, "Ask what you do for your country.".split())  # one word
    assert not drops_words(shown, "Ask what you could do for your country.".split())
    assert not drops_words(shown, "Ask what you can do.".split())  # partial's end cut off
    assert not drops_words([], "Ask what".split())
