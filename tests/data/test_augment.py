import random

import numpy as np
import pytest

from budgetlora.config import AugmentConfig, FilterConfig
from budgetlora.data.augment import Augmenter, augment_texts, synonyms, wordnet_dir
from budgetlora.data.filters import apply_filters, cartography_select, near_duplicates


def _has_wordnet() -> bool:
    try:
        wordnet_dir()
        return True
    except RuntimeError:
        return False


needs_wordnet = pytest.mark.skipif(not _has_wordnet(), reason="WordNet not installed (scripts/install_wordnet.sh)")

TEXTS = [
    "Stocks rallied on Wall Street today as the car maker reported strong quarterly earnings and raised its outlook.",
    "The home team won the final game of the season after a dramatic comeback in the last quarter of play.",
    "Scientists discovered a new species of fish living near deep volcanic vents in the southern ocean floor.",
    "Government officials met in the capital to discuss a new trade agreement between the two large nations.",
] * 5
ALL = AugmentConfig(synonym=0.2, insert=0.1, swap=0.1, delete=0.1, char_noise=0.02)
NO_DB = AugmentConfig(swap=0.2, delete=0.2, char_noise=0.05)


@pytest.mark.parametrize("cfg", [NO_DB, pytest.param(ALL, marks=needs_wordnet)])
def test_reproducible_and_varies_by_epoch(cfg):
    state = random.getstate()
    a = augment_texts(TEXTS, cfg, seed=3, epoch=1)
    assert a == augment_texts(TEXTS, cfg, seed=3, epoch=1)
    assert random.getstate() == state  # the global RNG is never used
    assert a != augment_texts(TEXTS, cfg, seed=3, epoch=2)
    assert a != augment_texts(TEXTS, cfg, seed=4, epoch=1)
    assert a != TEXTS


@pytest.mark.parametrize("knob", ["synonym", "insert", "swap", "delete", "char_noise"])
def test_each_knob_at_zero_is_identity_and_on_changes(knob):
    if knob in ("synonym", "insert") and not _has_wordnet():
        pytest.skip("WordNet not installed")
    assert augment_texts(TEXTS, AugmentConfig(), seed=0, epoch=0) == TEXTS
    assert not AugmentConfig().enabled
    cfg = AugmentConfig(**{knob: 0.3})
    assert cfg.enabled
    assert augment_texts(TEXTS, cfg, seed=0, epoch=0) != TEXTS


def test_swap_keeps_words_and_delete_never_empties():
    out = augment_texts(TEXTS, AugmentConfig(swap=0.5), seed=1, epoch=0)
    assert [sorted(o.split()) for o in out] == [sorted(t.split()) for t in TEXTS]
    texts = ["one", "two words", "a b c d e f"] * 50
    out = augment_texts(texts, AugmentConfig(delete=1.0), seed=1, epoch=0)
    assert all(len(o.split()) == 1 and o in t.split() for o, t in zip(out, texts))
    out = augment_texts(texts, AugmentConfig(delete=0.5), seed=2, epoch=0)
    assert all(o.strip() and set(o.split()) <= set(t.split()) for o, t in zip(out, texts))


def test_char_noise_only_touches_letters():
    out = augment_texts(["1234 !!! 5678"] * 10, AugmentConfig(char_noise=1.0), seed=0, epoch=0)
    assert out == ["1234 !!! 5678"] * 10
    out = augment_texts(["hello world"] * 20, AugmentConfig(char_noise=0.3), seed=0, epoch=0)
    assert any(o != "hello world" for o in out) and all(o.strip() for o in out)


def test_invalid_probability():
    with pytest.raises(ValueError):
        AugmentConfig(swap=1.5)


@needs_wordnet
def test_synonyms_are_real():
    assert {"auto", "automobile", "machine", "motorcar"} <= set(synonyms("car"))
    assert "car" not in synonyms("car")
    assert synonyms("Car") == synonyms("car")
    assert synonyms("xqzzyv") == ()
    out = augment_texts(["car"] * 20, AugmentConfig(synonym=1.0), seed=0, epoch=0)
    assert set(out) <= set(synonyms("car")) and len(set(out)) > 1
    # case and punctuation survive; function words are never replaced
    out = augment_texts(["The Car."] * 20, AugmentConfig(synonym=1.0), seed=0, epoch=0)
    assert all(o.startswith("The ") and o.endswith(".") and o[4].isupper() for o in out)


@needs_wordnet
def test_insert_adds_synonyms_of_text_words():
    syns = set(synonyms("car"))
    out = augment_texts(["car"] * 10, AugmentConfig(insert=1.0), seed=0, epoch=0)
    for o in out:  # one word, so exactly one synonym lands before or after it
        assert (o.startswith("car ") and o[4:] in syns) or (o.endswith(" car") and o[:-4] in syns)


def test_missing_wordnet_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("BUDGETLORA_WORDNET", str(tmp_path))
    with pytest.raises(RuntimeError, match="install_wordnet.sh"):
        Augmenter(AugmentConfig(synonym=0.1))
    assert augment_texts(["a b c"], AugmentConfig(swap=1.0), seed=0, epoch=0)  # other knobs need no database


# ---------------------------------------------------------------- filters

F_TEXTS = [
    "short",  # 0: 1 word
    "a perfectly normal sentence about the market today",  # 1
    "!!! ### $$$ %%% ^^^ &&& *** ((( )))",  # 2: nearly all symbols
    "A perfectly   NORMAL sentence about the market today",  # 3: exact dup of 1 after normalising
    "one two three four five six seven eight nine ten eleven twelve",  # 4: 12 words
    "the team won the final game of the season after a comeback in the last minute",  # 5
    "the team won the final game of the season after a comeback in the last second",  # 6: near dup of 5
    "scientists found a new fish near volcanic vents deep in the southern ocean",  # 7
]
F_LABELS = [0, 1, 2, 1, 3, 2, 0, 3]


def test_filters_each_remove_expected_rows():
    kept, rep = apply_filters(F_TEXTS, F_LABELS, FilterConfig(min_words=2), 4)
    assert kept == [1, 2, 3, 4, 5, 6, 7]
    assert rep == {"min_words": {"removed": 1, "per_class": [1, 0, 0, 0]}, "kept": 7}
    kept, rep = apply_filters(F_TEXTS, F_LABELS, FilterConfig(max_words=12), 4)
    assert kept == [0, 1, 2, 3, 4]
    assert rep["max_words"] == {"removed": 3, "per_class": [1, 0, 1, 1]}
    kept, rep = apply_filters(F_TEXTS, F_LABELS, FilterConfig(max_non_alnum=0.3), 4)
    assert kept == [0, 1, 3, 4, 5, 6, 7] and rep["max_non_alnum"]["per_class"] == [0, 0, 1, 0]
    kept, rep = apply_filters(F_TEXTS, F_LABELS, FilterConfig(dedup_exact=True), 4)
    assert kept == [0, 1, 2, 4, 5, 6, 7] and rep["dedup_exact"] == {"removed": 1, "per_class": [0, 1, 0, 0]}
    kept, rep = apply_filters(F_TEXTS, F_LABELS, FilterConfig(dedup_near=0.7), 4)
    # 3 is an exact dup of 1 once lowercased, 6 shares 13 of 15 shingles with 5
    assert kept == [0, 1, 2, 4, 5, 7] and rep["dedup_near"] == {"removed": 2, "per_class": [1, 1, 0, 0]}
    kept, rep = apply_filters(F_TEXTS, F_LABELS, FilterConfig(), 4)
    assert kept == list(range(8)) and rep == {"kept": 8}


def test_filters_chain_and_report():
    cfg = FilterConfig(min_words=2, max_non_alnum=0.3, dedup_exact=True, dedup_near=0.7)
    kept, rep = apply_filters(F_TEXTS, F_LABELS, cfg, 4)
    assert kept == [1, 4, 5, 7]
    assert rep["min_words"]["removed"] == 1 and rep["max_non_alnum"]["removed"] == 1
    assert rep["dedup_exact"]["removed"] == 1 and rep["dedup_near"] == {"removed": 1, "per_class": [1, 0, 0, 0]}
    assert rep["kept"] == 4


def test_token_filters_use_the_counter():
    calls = []

    def fake_count(texts):  # one token per character: easy to reason about
        calls.append(len(texts))
        return [len(t) for t in texts]

    kept, rep = apply_filters(F_TEXTS, F_LABELS, FilterConfig(min_tokens=6, max_tokens=75), 4, count_tokens=fake_count)
    assert kept == [1, 2, 3, 4, 7]  # 0 has 5 chars; 5 and 6 have 77
    assert rep["min_tokens"] == {"removed": 1, "per_class": [1, 0, 0, 0]}
    assert rep["max_tokens"] == {"removed": 2, "per_class": [1, 0, 1, 0]}
    assert calls == [8]  # counted once, in a batch
    with pytest.raises(ValueError):
        apply_filters(F_TEXTS, F_LABELS, FilterConfig(max_tokens=10), 4)


def test_near_duplicates_scale_and_threshold():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(2000)]
    base = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(1500)]
    # a copy with the last two words changed: 26 of 28 shingles kept, Jaccard 26/30 ~ 0.87
    edited = [t.rsplit(" ", 2)[0] + " zzz yyy" for t in base[:300]]
    dups = near_duplicates(base + edited, 0.8)
    assert dups == list(range(1500, 1800))
    assert near_duplicates(base + edited, 0.9) == []


# ---------------------------------------------------------------- cartography


def test_cartography_drops_lowest_confidence():
    rng = np.random.default_rng(0)
    n, e, c = 40, 3, 4
    labels = rng.integers(0, c, size=n)
    gold_p = rng.uniform(0.3, 0.95, size=n)
    gold_p[[5, 17, 30, 33]] = [0.01, 0.02, 0.03, 0.04]  # consistently wrong: the "hard" rows
    probs = np.full((e, n, c), 0.0)
    for i in range(n):
        probs[:, i, :] = (1 - gold_p[i]) / (c - 1)
        probs[:, i, labels[i]] = gold_p[i]
    probs[1, 7, :] = 0.25  # one noisy epoch gives row 7 a large variability
    kept, rep = cartography_select(probs, labels, drop_fraction=0.1)
    assert sorted(set(range(n)) - set(kept.tolist())) == [5, 17, 30, 33]
    assert rep["removed"] == 4 and rep["kept"] == 36
    assert rep["per_class"] == np.bincount(labels[[5, 17, 30, 33]], minlength=c).tolist()
    kept, rep = cartography_select(probs, labels, drop_fraction=1 / n, mode="ambiguous")
    assert 7 not in kept and len(kept) == n - 1
    kept, _ = cartography_select(probs, labels, drop_fraction=0.0)
    assert kept.tolist() == list(range(n))
    with pytest.raises(ValueError):
        cartography_select(probs, labels, 0.1, mode="easy")
