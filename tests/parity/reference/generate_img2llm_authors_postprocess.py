"""Write fixtures/img2llm/authors_postprocess.json: Img2LLM answers post-processed by the authors' own code.

Usage::

    NLTK_DATA=DIR python tests/parity/reference/generate_img2llm_authors_postprocess.py PATH/TO/Img2Prompt [--commit SHA]

PATH is a checkout of https://github.com/CR-Gjx/Img2Prompt (the goldens were made at commit
5b838d1650e30495139325c0bb98294c179ecedc). Nothing of that code is copied here: the script imports
``VL_captioning/utils.py`` from the checkout and runs, on the raw completions listed below, exactly what
``evaluation()`` of ``Imape2Prompt_evaluation.py`` does to the LLM's decoded text::

    pred_answer = utils.postprocess_Answer([decoded], dataset)   # dataset "okvqa" or "vqa"
    pred_answer = pred_answer.lower()
    pred_answer = utils.remove_useless_token(pred_answer)

It needs NLTK (the goldens were made with nltk 3.8.1; 3.7 behaves the same in everything used here but
needs the omw-1.4 corpus to open WordNet) and, under ``NLTK_DATA``, the three data packages the authors'
module downloads when imported: ``tokenizers/punkt`` (``PY3/english.pickle``),
``taggers/averaged_perceptron_tagger`` and ``corpora/wordnet`` (WordNet 3.0). ``nltk.download`` is
replaced by a check that the package is already there, so nothing is fetched and a missing package is
an error instead of a silent fallback.

``utils.py`` imports torch (and its tensorboard and distributed modules) and loads spaCy's
``en_core_web_sm`` at import time; the post-processing functions use none of them, so they are replaced
by empty stub modules in ``sys.modules`` before the import (numpy too, when it is not installed).

Besides the final answers the file records what NLTK itself gives for the same text, so capvqa's rule can
be tested without NLTK or its data: for every completion that reaches the OK-VQA step, the tokens of
``pos_tag(word_tokenize(text))`` with their tags and ``WordNetLemmatizer`` lemmas (as a verb, then that as
a noun); and for a fixed word list (WordNet's exception lists, inflected WordNet lemmas and common answer
words, every nth chosen so the file stays small) the verb and noun lemmas of each word.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUTPUT = HERE.parent / "fixtures" / "img2llm" / "authors_postprocess.json"
DATASETS = {"okvqa": "okvqa", "vqav2": "vqa"}  # capvqa task -> the script's --dataset
# what nltk.download(name) must find already installed
NLTK_PACKAGES = {
    "punkt": "tokenizers/punkt/PY3/english.pickle",
    "averaged_perceptron_tagger": "taggers/averaged_perceptron_tagger/averaged_perceptron_tagger.pickle",
    "wordnet": "corpora/wordnet/index.noun",
}

# --------------------------------------------------------------------------------------------------
# Fixed inputs: completions as the authors' script decodes them (OPT puts a space before the first word
# after "Answer:", and the 10 new tokens usually run on into the next exemplar)

RAW_COMPLETIONS: tuple[str, ...] = (
    # neither "." nor a line break: the text is only lower-cased, never lemmatised
    " dogs",
    " Two Dogs Running",
    " it is a dog",
    "it is a dog",
    "they are playing tennis",
    " because it is raining",
    # a period or a line break first
    " dogs.",
    " The dogs are running. Question: what",
    " skiing\nQuestion: What is",
    "\nQuestion: What",
    ". dogs",
    "",
    " \n",
    " dog \n",
    " New York City.\n",
    " USA\n",
    " Ice Cream\n",
    # digits: the flag stays set for the rest of the answer
    " 1990s fashion\n",
    " 3 dogs\n",
    " dogs 3 cats\n",
    " two dogs\n",
    " 4th of july\n",
    " x² plates\n",
    # words ending in "ed"; VBD / VBN tags
    " painted walls\n",
    " used cars\n",
    " need\n",
    " seeds\n",
    " it was made of wood\n",
    " broken glass\n",
    " they were eaten\n",
    " frozen yogurt\n",
    " it is worn out\n",
    " grown ups\n",
    " he ran away\n",
    " left\n",
    " the one on the left\n",
    # the leading phrases of remove_useless_token (lemmatised to "be" on OK-VQA, kept on VQAv2)
    " because it is raining.",
    " because it be raining\n",
    " because he is hungry\n",
    " because she is tired\n",
    " because she likes it\n",
    " because they are hungry\n",
    " they are sleeping\n",
    " because of the rain\n",
    " because it's cold\n",
    " because he wants to\n",
    " it is sunny\n",
    " he is surfing\n",
    " she is cooking\n",
    " because it is they are red\n",
    # the dropped prepositions ("up to" is in the list but never matches one token)
    " on the table\n",
    " in the kitchen\n",
    " made with flour\n",
    " for surfing with friends\n",
    " about 10 feet\n",
    " at the beach\n",
    " to eat\n",
    " up to 10 people\n",
    " into the water\n",
    # plurals and verbs
    " bananas\n",
    " glasses\n",
    " women\n",
    " leaves\n",
    " species\n",
    " buses\n",
    " mice\n",
    " knives\n",
    " running\n",
    " flies\n",
    " is sleeping\n",
    " has\n",
    " goes\n",
    " as\n",
    " us\n",
    # punctuation, contractions, quotes
    " don't know\n",
    " dog's bone\n",
    " yes, it is\n",
    " what? no\n",
    ' "hot dog"\n',
    " rock 'n' roll\n",
    " hot-dog stand\n",
    " salt & pepper\n",
    "  double  spaces \n",
    " 'tis the season\n",
    " well—known brand\n",
)

# common short answers (OK-VQA style) for the lemma table
ANSWER_WORDS = (
    "apples",
    "bananas",
    "oranges",
    "sandwiches",
    "pizzas",
    "vegetables",
    "cookies",
    "donuts",
    "cakes",
    "giraffes",
    "zebras",
    "elephants",
    "horses",
    "sheep",
    "cows",
    "cats",
    "dogs",
    "birds",
    "geese",
    "skiing",
    "surfing",
    "skateboarding",
    "snowboarding",
    "playing",
    "eating",
    "sleeping",
    "flying",
    "riding",
    "sitting",
    "standing",
    "walking",
    "running",
    "swimming",
    "cooking",
    "reading",
    "raining",
    "trains",
    "buses",
    "trucks",
    "planes",
    "bikes",
    "motorcycles",
    "boats",
    "kites",
    "umbrellas",
    "clocks",
    "benches",
    "couches",
    "chairs",
    "tables",
    "beds",
    "ties",
    "glasses",
    "shoes",
    "clothes",
    "pants",
    "jeans",
    "shorts",
    "scissors",
    "teeth",
    "feet",
    "children",
    "people",
    "women",
    "men",
    "lives",
    "knives",
    "wolves",
    "leaves",
    "shelves",
    "potatoes",
    "tomatoes",
    "mangoes",
    "heroes",
    "species",
    "series",
    "news",
    "physics",
    "christmas",
    "texas",
    "as",
    "is",
    "was",
    "has",
    "does",
    "goes",
    "us",
    "its",
    "this",
    "yes",
    "dies",
    "lies",
    "flies",
    "tries",
    "cries",
    "fries",
    "skies",
    "stripes",
    "spots",
    "feathers",
    "wings",
    "paws",
    "hooves",
    "horns",
    "antlers",
    "tails",
    "whiskers",
    "made",
    "built",
    "worn",
    "broken",
    "frozen",
    "eaten",
    "grown",
    "thrown",
    "taken",
    "seen",
    "done",
    "left",
    "held",
    "sold",
    "told",
    "ran",
    "ate",
    "flew",
    "drove",
    "wore",
    "saw",
    "went",
    "came",
    "painted",
    "used",
    "parked",
    "stuffed",
    "fried",
    "baked",
    "need",
    "bed",
    "red",
    "shed",
    "seed",
    "speed",
    "hundred",
    "tied",
    "died",
    "dyed",
    "rode",
    "swam",
    "sang",
    "rang",
    "hung",
    "stood",
    "better",
    "best",
    "bigger",
    "biggest",
    "happier",
    "less",
    "more",
    "most",
    "others",
    "ones",
    "dices",
    "data",
    "media",
    "bacteria",
    "cacti",
    "fungi",
    "octopi",
    "mice",
    "lice",
    "oxen",
    "1990s",
    "2nd",
    "3rd",
    "4th",
    "50s",
    "mp3s",
    "x²",
    "i",
    "a",
    "an",
    "the",
    "of",
    "to",
    "in",
    "don't",
    "can't",
    "n't",
    "'s",
    "'re",
    "'ll",
    ",",
    "?",
    "!",
    "''",
    "``",
    "-",
    "&",
    "being",
    "having",
    "doing",
    "going",
    "using",
    "making",
    "taking",
    "coming",
    "leaving",
    "dying",
    "lying",
    "tying",
    "skis",
    "taxis",
    "kiwis",
    "pianos",
    "photos",
    "zeros",
    "echoes",
    "volcanoes",
    "analyses",
    "theses",
    "crises",
    "axes",
    "indices",
    "matrices",
    "vertices",
    "appendices",
    "statuses",
    "viruses",
    "campuses",
    "bonuses",
    "boxes",
    "foxes",
    "quizzes",
    "buzzes",
    "wishes",
    "churches",
    "watches",
    "brushes",
    "dishes",
    "classes",
    "kisses",
    "bosses",
    "dresses",
    "gases",
)


# --------------------------------------------------------------------------------------------------
# Importing the authors' module


def _stub(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module


def _stub_heavy_modules() -> None:
    """torch (no_grad, autograd.Function, distributed, utils.tensorboard), en_core_web_sm, numpy."""
    torch = _stub("torch", no_grad=lambda: lambda fn: fn)
    torch.autograd = _stub("torch.autograd", Function=object)
    torch.distributed = _stub("torch.distributed")
    torch.utils = _stub("torch.utils")
    torch.utils.tensorboard = _stub("torch.utils.tensorboard", SummaryWriter=object)
    _stub("en_core_web_sm", load=lambda *args, **kwargs: object())
    if importlib.util.find_spec("numpy") is None:
        _stub("numpy")


def _forbid_downloads(nltk: Any) -> None:
    def check_installed(name: str, *args: Any, **kwargs: Any) -> bool:
        resource = NLTK_PACKAGES.get(name)
        if resource is None:
            raise SystemExit(
                f"the authors' module asked for NLTK package {name!r}, which this script does not know"
            )
        try:
            nltk.data.find(resource)
        except LookupError:
            raise SystemExit(
                f"NLTK package {name!r} ({resource}) is not under NLTK_DATA; install it first"
            ) from None
        return True

    nltk.download = check_installed


def load_authors_utils(checkout: Path) -> Any:
    source = checkout / "VL_captioning" / "utils.py"
    if not source.is_file():
        raise SystemExit(f"{source} not found: pass the root of an Img2Prompt checkout")
    _stub_heavy_modules()
    nltk = importlib.import_module("nltk")
    _forbid_downloads(nltk)
    spec = importlib.util.spec_from_file_location("img2prompt_utils", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def authors_answer(utils: Any, raw: str, dataset: str) -> str:
    """What evaluation() stores as the prediction for the decoded text ``raw``."""
    with contextlib.redirect_stdout(io.StringIO()):  # postprocess_Answer prints every answer
        answer = utils.postprocess_Answer([raw], dataset)
    return utils.remove_useless_token(answer.lower())


# --------------------------------------------------------------------------------------------------
# What NLTK gives for the same text (for testing capvqa's rule without NLTK)


def nltk_analysis(raw: str) -> list[list[str]] | None:
    """Tokens, tags and verb-then-noun lemmas of the text the OK-VQA step sees (None: it does not run)."""
    from nltk import pos_tag, word_tokenize
    from nltk.stem import WordNetLemmatizer

    cut = min((i for i in (raw.find("."), raw.find("\n")) if i >= 0), default=-1)
    if cut < 0:
        return None
    text = raw[:cut].lower()
    if not text:
        return None
    lemmatizer = WordNetLemmatizer()
    return [
        [word, tag, lemmatizer.lemmatize(lemmatizer.lemmatize(word, "v"), "n")]
        for word, tag in pos_tag(word_tokenize(text))
    ]


def lemma_words() -> list[str]:
    """The fixed word list of the lemma table (deterministic: sorted sources, every nth entry)."""
    from nltk.corpus import wordnet

    words: dict[str, None] = dict.fromkeys(ANSWER_WORDS)
    for pos, step in (("n", 4), ("v", 4)):
        exceptions = sorted(wordnet._exception_map[pos])
        words.update(dict.fromkeys(exceptions[::step]))
    nouns = sorted(name for name in wordnet.all_lemma_names("n") if name.isalpha())
    for lemma in nouns[::300]:
        words.update(dict.fromkeys([lemma, lemma + "s", lemma + "es"]))
    verbs = sorted(name for name in wordnet.all_lemma_names("v") if name.isalpha())
    for lemma in verbs[::40]:
        words.update(dict.fromkeys([lemma + "s", lemma + "es", lemma + "ed", lemma + "ing"]))
    for raw in RAW_COMPLETIONS:
        for row in nltk_analysis(raw) or []:
            words[row[0]] = None
    return list(words)


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build(checkout: Path, commit: str) -> dict[str, Any]:
    utils = load_authors_utils(checkout)
    import nltk
    from nltk.corpus import wordnet
    from nltk.stem import WordNetLemmatizer

    cases = []
    for raw in RAW_COMPLETIONS:
        cases.append(
            {
                "raw": raw,
                "answers": {task: authors_answer(utils, raw, dataset) for task, dataset in DATASETS.items()},
                "nltk": nltk_analysis(raw),
            }
        )
    lemmatizer = WordNetLemmatizer()
    lemmas = [[w, lemmatizer.lemmatize(w, "v"), lemmatizer.lemmatize(w, "n")] for w in lemma_words()]
    return {
        "source": {
            "repository": "https://github.com/CR-Gjx/Img2Prompt",
            "commit": commit,
            "file": "VL_captioning/utils.py",
            "functions": ["postprocess_Answer", "remove_useless_token"],
            "call": "remove_useless_token(postprocess_Answer([raw], dataset).lower())",
        },
        "nltk": {
            "version": nltk.__version__,
            "wordnet": wordnet.get_version(),
            "sha256": {name: _sha256(str(nltk.data.find(path))) for name, path in NLTK_PACKAGES.items()},
        },
        "cases": cases,
        "lemmas": lemmas,
    }


def _checkout_commit(checkout: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="root of a CR-Gjx/Img2Prompt checkout")
    parser.add_argument("--commit", help="the checkout's commit, when it is not a git work tree")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    commit = args.commit or _checkout_commit(args.checkout)
    if not commit:
        raise SystemExit("cannot tell the checkout's commit; pass --commit")
    golden = build(args.checkout, commit)
    args.output.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.output}: {len(golden['cases'])} completions, {len(golden['lemmas'])} lemma rows")


if __name__ == "__main__":
    main()
