"""Train-time text augmentation: cheap word and character edits (the row filters and the noisy-label filter are
in `filters`).

Everything here is pure Python + numpy so it can run inside a data pipeline without touching the model.

* `augment_texts` applies EDA-style edits (synonym replacement, random insertion, swap, deletion) and typos,
  deterministically for a (seed, epoch) pair so each epoch sees a fresh but reproducible view of the data.

Synonyms come from an offline WordNet 3.0 database (Debian package `wordnet-base`, see
`scripts/install_wordnet.sh`), read directly from its `index.*` / `data.*` files: the format is simple and this
avoids a heavyweight dependency whose reader also expects files Debian does not ship (`lexnames`).
"""
from __future__ import annotations

import functools
import math
import os
import random
import re
from pathlib import Path

from budgetlora.config import AugmentConfig
from budgetlora.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------------
# WordNet
# ----------------------------------------------------------------------------------------------------------------

WORDNET_ENV = "BUDGETLORA_WORDNET"
_WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/WordNet-3.0/dict")
_POS = ("noun", "verb", "adj", "adv")

# Function words have WordNet entries that are never sensible substitutes ("a" -> "angstrom", "in" -> "Indiana"),
# so they are neither replaced nor used as insertion seeds.
_STOP = frozenset(
    "a an the and or but nor so yet for of in on at to from by with as into onto upon about above below over under "
    "after before between through during without within against among is am are was were be been being have has "
    "had do does did will would shall should can could may might must i me my we us our you your he him his she "
    "her it its they them their this that these those who whom whose which what when where why how not no all any "
    "each few more most other some such only own same than too very just also there here then once again up down "
    "out off if s t".split()
)
# punctuation around an alphabetic core of 2+ letters; single letters ("x" -> "ten") are left alone
_WORD_CORE = re.compile(r"^(\W*)([A-Za-z][A-Za-z'-]*[A-Za-z])(\W*)$")


class WordNetMissing(ConfigError, RuntimeError):
    """augment.synonym or augment.insert on a machine without the WordNet database (a RuntimeError, as it was)."""


def wordnet_dir() -> Path:
    """The WordNet database folder: `$BUDGETLORA_WORDNET`, else the first standard location that has one."""
    env = os.environ.get(WORDNET_ENV)
    for d in ([env] if env else _WORDNET_DIRS):
        if all((Path(d) / f"{kind}.{pos}").is_file() for kind in ("index", "data") for pos in _POS):
            return Path(d)
    where = f"${WORDNET_ENV}={env}" if env else ", ".join(_WORDNET_DIRS)
    raise WordNetMissing(f"WordNet database not found in {where}; install it with `bash scripts/install_wordnet.sh`")


@functools.lru_cache(maxsize=4)
def _load_wordnet(folder: str) -> dict[str, tuple[dict[str, str], bytes]]:
    """pos -> (lemma -> rest of its index line, raw data file). Loaded once (~30 MB), parsed lazily per word."""
    db = {}
    for pos in _POS:
        index = {}
        with open(Path(folder) / f"index.{pos}", encoding="utf-8") as f:
            for line in f:
                if not line.startswith(" "):  # lines starting with a space are the licence header
                    lemma, _, rest = line.partition(" ")
                    index[lemma] = rest
        db[pos] = (index, (Path(folder) / f"data.{pos}").read_bytes())
    return db


def _synset_words(data: bytes, offset: int) -> list[str]:
    # data line: offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt ...
    end = data.index(b"\n", offset)
    parts = data[offset:end].decode("utf-8").split(" ")
    n = int(parts[3], 16)
    # adjectives may carry a syntactic marker such as "galore(ip)"
    return [re.sub(r"\(.*\)$", "", parts[4 + 2 * i]) for i in range(n)]


@functools.lru_cache(maxsize=200_000)
def synonyms(word: str) -> tuple[str, ...]:
    """Sorted WordNet synonyms of `word` over all parts of speech (exact lemma match, case-insensitive).

    Multi-word lemmas come back with spaces ("motor vehicle"); the word itself is excluded.
    """
    key = word.lower().replace(" ", "_")
    out = set()
    for index, data in _load_wordnet(str(wordnet_dir())).values():
        rest = index.get(key)
        if rest is None:
            continue
        # index line (after the lemma): pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offset{synset_cnt}
        parts = rest.split()
        n_synsets = int(parts[1])
        for off in parts[len(parts) - n_synsets:]:
            out.update(w.lower() for w in _synset_words(data, int(off)))
    out.discard(key)
    return tuple(sorted(w.replace("_", " ") for w in out))


# ----------------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------------


_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _neighbours() -> dict[str, str]:
    """Letters adjacent on a QWERTY keyboard (same row and the rows above/below), for realistic typos."""
    pos = {c: (r, i) for r, row in enumerate(_KEYBOARD) for i, c in enumerate(row)}
    return {
        c: "".join(o for o, (r2, i2) in pos.items() if o != c and abs(r2 - r) <= 1 and abs(i2 - i) <= 1)
        for c, (r, i) in pos.items()
    }


_NEIGHBOURS = _neighbours()


def _hits(rng: random.Random, n: int, p: float) -> list[int]:
    """Indices in range(n) that each succeed with probability p, drawn by geometric skips.

    Costs O(number of hits) instead of one draw per item, which keeps per-character noise on a full
    training set to a fraction of a second.
    """
    if p <= 0.0 or n == 0:
        return []
    if p >= 1.0:
        return list(range(n))
    log_q = math.log1p(-p)
    out, i = [], -1
    while True:
        i += 1 + int(math.log(1.0 - rng.random()) / log_q)
        if i >= n:
            return out
        out.append(i)


def _split_core(word: str) -> tuple[str, str, str] | None:
    """(leading punctuation, alphabetic core, trailing punctuation), or None for numbers/symbols."""
    m = _WORD_CORE.match(word)
    return m.groups() if m else None


def _match_case(new: str, old: str) -> str:
    if old.isupper() and len(old) > 1:
        return new.upper()
    return new[:1].upper() + new[1:] if old[:1].isupper() else new


def _synonym_of(word: str, rng: random.Random) -> tuple[str, tuple[str, str, str]] | None:
    """A random synonym of the word's core in the word's case, with the core's split; None if it has none."""
    parts = _split_core(word)
    if parts is None or parts[1].lower() in _STOP:
        return None
    syns = synonyms(parts[1])
    if not syns:
        return None
    return _match_case(rng.choice(syns), parts[1]), parts


class Augmenter:
    """Applies an `AugmentConfig` to texts; call `augment(text, rng)` per text or `__call__` for a batch."""

    def __init__(self, cfg: AugmentConfig):
        self.cfg = cfg
        if cfg.needs_wordnet:
            wordnet_dir()  # fail fast with the install hint, before any text is touched

    def augment(self, text: str, rng: random.Random) -> str:
        cfg = self.cfg
        words = text.split()
        if not words or not cfg.enabled:
            return text
        for i in _hits(rng, len(words), cfg.synonym):
            found = _synonym_of(words[i], rng)
            if found:
                new, (lead, _, trail) = found
                words[i] = lead + new + trail
        n_insert = len(_hits(rng, len(words), cfg.insert))
        for _ in range(n_insert):
            for _attempt in range(3):  # a few tries: many words (names, numbers) have no synonyms
                found = _synonym_of(rng.choice(words), rng)
                if found:
                    words.insert(rng.randrange(len(words) + 1), found[0].lower())
                    break
        for i in _hits(rng, len(words), cfg.swap):
            j = rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        if cfg.delete > 0:
            dropped = set(_hits(rng, len(words), cfg.delete))
            kept = [w for i, w in enumerate(words) if i not in dropped]
            words = kept or [rng.choice(words)]
        out = " ".join(words)
        if cfg.char_noise > 0:
            out = self._typos(out, rng) or out  # a typo could erase a one-letter text; keep it then
        return out

    def _typos(self, text: str, rng: random.Random) -> str:
        chars = list(text)
        for i in reversed(_hits(rng, len(chars), self.cfg.char_noise)):  # reversed: edits don't shift later hits
            c = chars[i]
            near = _NEIGHBOURS.get(c.lower())
            if not near:
                continue  # only letters get typos; spaces, digits and punctuation stay
            op = rng.randrange(3)
            if op == 0:
                del chars[i]
            elif op == 1:
                chars.insert(i, c)
            else:
                r = rng.choice(near)
                chars[i] = r.upper() if c.isupper() else r
        return "".join(chars).strip()

    def __call__(self, texts: list[str], seed: int, epoch: int) -> list[str]:
        if not self.cfg.enabled:
            return list(texts)
        # A private generator per (seed, epoch): reproducible, differs across epochs, leaves `random` untouched.
        rng = random.Random(seed * 1_000_003 + epoch)
        return [self.augment(t, rng) for t in texts]


def augment_texts(texts: list[str], cfg: AugmentConfig, seed: int, epoch: int) -> list[str]:
    """Augmented copies of `texts`, deterministic for (seed, epoch)."""
    return Augmenter(cfg)(texts, seed, epoch)
