"""Word lists for the offline haystack and the RULER-style keys, written for this project.

Everything a synthetic task needs comes from here, so prompts are reproducible without downloads.
No word contains a digit, a hyphen or an upper-case letter: numbers, hyphenated keys and VAR names
inserted by the tasks can then never be confused with filler text.
"""

from __future__ import annotations

ADJECTIVES = tuple(
    """
    ancient bitter bold brave brief bright broad calm careful cheerful clever cold quiet curious
    damp dark deep distant dry dusty eager early empty faint famous fierce flat fragile fresh gentle
    glad golden grand green grey heavy hidden hollow honest humble icy idle keen kind large late lazy
    little lively lonely loud lucky mellow mighty modest narrow neat noble odd old pale patient plain
    polite proud pure quick rapid rare rich rough round royal rusty sacred sharp shiny short silent
    simple sleepy slow small smooth soft solid sour spare steady steep stern still strange strong
    sudden sunny sweet swift tall tame tender thick thin tidy tiny tired tough vast velvet warm weary
    wet wide wild wise wooden young zealous amber crimson silver scarlet azure
    """.split()
)

NOUNS = tuple(
    """
    anchor apple arrow badge bakery basket beacon bell bicycle blanket bottle bridge bucket cabin
    camera candle canyon carpet castle cellar chair chapel cherry chimney clock cloud compass cookie
    cottage crayon crown cupboard curtain desert diamond dolphin drum eagle engine falcon feather
    fence ferry fiddle forest fountain garden garlic giraffe glacier harbor helmet hill honey horizon
    island jacket jungle kettle kitten ladder lagoon lantern lemon library lighthouse lizard magnet
    mango market meadow mirror monkey mountain museum needle notebook ocean orchard otter oven owl
    paddle palace panther parrot pebble pencil pepper piano pillow pirate planet pocket pond potato
    puzzle quilt rabbit radio raven ribbon river robot rocket saddle sailor salmon scarf shadow shell
    shovel siren sparrow spider statue stone storm sunset sweater teapot temple tiger tomato tower
    tractor trumpet tunnel turtle umbrella valley violin volcano wagon walrus whale whistle window
    wizard wolf yacht zebra
    """.split()
)

VERBS = tuple(  # base, past, past participle
    tuple(v.split(":"))
    for v in """
    admire:admired:admired borrow:borrowed:borrowed build:built:built carry:carried:carried
    clean:cleaned:cleaned collect:collected:collected cover:covered:covered describe:described:described
    discover:discovered:discovered draw:drew:drawn explore:explored:explored find:found:found
    follow:followed:followed gather:gathered:gathered guard:guarded:guarded hide:hid:hidden
    imagine:imagined:imagined inspect:inspected:inspected keep:kept:kept lift:lifted:lifted
    measure:measured:measured mend:mended:mended move:moved:moved notice:noticed:noticed
    observe:observed:observed paint:painted:painted plant:planted:planted polish:polished:polished
    praise:praised:praised protect:protected:protected repair:repaired:repaired ring:rang:rung
    sell:sold:sold share:shared:shared study:studied:studied sweep:swept:swept teach:taught:taught
    trade:traded:traded visit:visited:visited wash:washed:washed watch:watched:watched
    weave:wove:woven write:wrote:written
    """.split()
)

ADVERBS = tuple(
    """
    briskly calmly carefully cheerfully eagerly gently gladly honestly kindly loudly neatly
    patiently politely proudly quickly quietly rarely slowly softly steadily suddenly swiftly
    tenderly warmly wisely
    """.split()
)

PLACES = tuple(
    """
    the old harbor|the village square|the edge of the forest|the top of the hill|the quiet library|
    the busy market|the river bank|the mountain pass|the royal garden|the empty station|
    the northern coast|the small workshop|the winter cabin|the city museum|the sunny orchard|
    the long bridge|the school yard|the desert road|the crowded bakery|the stone chapel
    """.replace("\n", "").split("|")
)

TIMES = tuple(
    """
    the early morning|the late afternoon|the middle of winter|the first week of spring|
    a rainy evening|the summer holidays|the harvest season|a cold night|the following year|
    the previous autumn|a quiet weekend|the long voyage
    """.replace("\n", "").split("|")
)

# Consonant/vowel pieces for pseudo-words when a task needs more distinct words than the lists hold
# (common-word extraction at long contexts needs thousands).
_ONSETS = "b br c ch d dr f fl g gr h j k l m n p pl r s sh sl st t tr v w z".split()
_VOWELS = "a e i o u ai ea oo".split()
_CODAS = ["", "n", "r", "l", "m", "s", "t", "k", "nd", "st"]


def real_words() -> list[str]:
    """Distinct real words (adjectives, nouns, verb bases), sorted."""
    return sorted(set(ADJECTIVES) | set(NOUNS) | {v[0] for v in VERBS} | set(ADVERBS))


def pseudo_word(index: int) -> str:
    """The ``index``-th pronounceable pseudo-word (three syllables; a bijection on the index).

    Deterministic; different indices give different syllable triples (the strings themselves can
    coincide, e.g. "ban"+"dra" and "band"+"ra": callers that need distinct words deduplicate).
    """
    syllables = []
    n_onset, n_vowel, n_coda = len(_ONSETS), len(_VOWELS), len(_CODAS)
    per = n_onset * n_vowel * n_coda
    total = per**3
    if not 0 <= index < total:
        raise ValueError("pseudo-word index out of range")
    # Scatter consecutive indices over the whole space (a golden-ratio multiplier coprime with
    # `total`), so that neighbouring words do not share syllables.
    index = (index * 5561633477) % total
    for _ in range(3):
        index, s = divmod(index, per)
        s, coda = divmod(s, n_coda)
        onset, vowel = divmod(s, n_vowel)
        syllables.append(_ONSETS[onset] + _VOWELS[vowel] + _CODAS[coda])
    return "".join(syllables)
