"""Tokenizers built offline, at any vocabulary size, for the tiny zoo and for real-size benchmarks.

Nothing here downloads anything. Each builder takes the vocabulary size (and optionally the corpus) as
arguments, so the same code makes the ~500-entry tokenizers of the tiny zoo and tokenizers with exactly
the sizes of the real checkpoints (:data:`REAL_TOKENIZER_SIZES`), which a benchmark needs to build
real-size random models without the hub.

How an exact size is reached (the corpus alone rarely yields it):

- **WordPiece (BLIP's BERT).** The vocabulary is written by hand: special tokens, single characters and
  their ``##`` continuations, a few hundred VQA words and suffix pieces, then synthetic ``[unusedN]``
  entries up to the requested base size; ``[DEC]`` and ``[ENC]`` are then added as the last two ids, as in
  BLIP (real size: 30522 + 2 = 30524, ``[DEC]`` = 30522, ``[ENC]`` = 30523). With
  ``num_leading_unused=99`` the first ids follow BERT's layout exactly (``[PAD]`` 0, ``[UNK]`` 100,
  ``[CLS]`` 101, ``[SEP]`` 102, ``[MASK]`` 103), so BLIP's config defaults (``sep_token_id=102``) hold.
- **SentencePiece unigram (T5).** A unigram model is trained on the corpus with ``hard_vocab_limit=False``
  (a small corpus cannot support 32,000 pieces); the model proto is then extended with synthetic pieces
  whose scores are far below any trained piece, so segmentation never picks them. T5's ``extra_ids``
  sentinels come on top (real size: 32,000 + 100 = 32,100).
- **Byte-level BPE (OPT, CLIP).** Merges are learnt with the ``tokenizers`` trainer; the vocabulary is
  then laid out deterministically (special tokens, the 256 byte symbols, merge products, synthetic
  entries, trailing special tokens). Synthetic entries have no merge producing them, so they are never
  emitted -- like the ``madeupword`` entries of the real OPT vocabulary.

The synthetic entries make the id space the right size; they carry no meaning. Builders are
deterministic: the same arguments give byte-identical saved tokenizers.
"""

from __future__ import annotations

import collections
import io
import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

from transformers import BertTokenizer, CLIPTokenizer, GPT2Tokenizer, T5Tokenizer

# Tokenizer lengths (len(tokenizer)) of the real checkpoints. The model embedding tables can be larger:
# T5 configs say 32,128 and OPT configs 50,272 (both padded to a multiple of 64 or 128).
REAL_TOKENIZER_SIZES: dict[str, int] = {
    "blip_bert": 30524,  # bert-base-uncased 30,522 + [DEC] + [ENC]
    "t5": 32100,  # 32,000 sentencepiece pieces + 100 <extra_id_N> sentinels
    "opt": 50265,  # GPT-2 byte-level BPE 50,257 + OPT's 4 specials + 4 "madeupword" entries
    "clip": 49408,  # 49,406 BPE entries + <|startoftext|> + <|endoftext|>
}
REAL_MODEL_VOCAB_SIZES: dict[str, int] = {"blip_bert": 30524, "t5": 32128, "opt": 50272, "clip": 49408}

BLIP_DECODER_TOKEN = "[DEC]"
BLIP_ENCODER_TOKEN = "[ENC]"

# ---------------------------------------------------------------------------------------------------
# Corpus: short VQA-style text in the shapes the pipelines produce (questions, captions, UnifiedQA
# passages with their literal backslash-n, question-generation inputs, Img2LLM and PICa prompts).

_VQA_WORDS_TEXT = """
    a an the this that these those there here is are was were be been being do does did has have had
    what which who whom whose where when why how many much color colour kind type sort brand name number
    of in on at to from with without by for about into onto over under above below behind near next
    between inside outside up down left right front back top bottom side middle center
    and or but not no yes it its they them their he she his her him you your we our i me my
    one two three four five six seven eight nine ten zero eleven twelve twenty hundred first second
    picture photo image man woman men women person people boy girl child children kid kids baby player
    dog dogs cat cats horse horses cow cows sheep bird birds elephant elephants giraffe zebra bear bears
    animal animals car cars bus truck train plane airplane boat bike bicycle motorcycle street road
    table chair bed couch sofa room kitchen bathroom toilet sink window door wall floor ceiling
    food pizza cake sandwich banana bananas apple apples orange oranges plate bowl cup glass bottle
    water grass tree trees sky cloud clouds snow beach ocean sea field park city building house sign
    light lights clock phone laptop computer tv television book books bag umbrella hat shirt dress
    ball bat racket frisbee kite skateboard surfboard skis tennis baseball soccer game sport
    red blue green yellow white black brown gray grey pink purple orange dark bright
    big small large little tall short long old young new open closed empty full wet dry hot cold
    sitting standing walking running playing eating holding riding wearing looking lying flying
    parked driving carrying watching talking smiling sleeping cooking cutting
    sit stand walk run play eat hold ride wear look lie fly park drive carry watch talk cook cut
    can could would should will may might must shall time day night morning weather season
    answer question context contexts please reason according given above q
    shown visible seen doing used using made happening wood metal plastic paper stone
    rocket astronaut coffee coins camera space hubble deep field sunny cloudy rainy
"""
VQA_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_VQA_WORDS_TEXT.split()))

VQA_SUFFIXES: tuple[str, ...] = (
    "s",
    "es",
    "ed",
    "ing",
    "er",
    "ers",
    "est",
    "ly",
    "y",
    "n",
    "en",
    "ness",
    "ful",
)

_OBJECTS = (
    "dog", "cat", "man", "woman", "bus", "pizza", "horse", "giraffe", "car", "bed", "table", "clock",
    "plate", "kite", "train", "rocket", "astronaut", "coffee cup", "motorcycle", "umbrella",
)  # fmt: skip
_COLORS = ("red", "blue", "green", "yellow", "white", "black", "brown", "gray", "orange", "pink")
_PLACES = ("on a table", "in a room", "on the street", "in a field", "next to a window", "on a bed",
           "in the sky", "near the beach", "in a kitchen", "in the park")  # fmt: skip
_QUESTION_TEMPLATES = (
    "what color is the {obj}?", "what is the {obj} doing?", "how many {obj}s are there?",
    "is there a {obj} in the picture?", "where is the {obj}?", "what is on the {obj}?",
    "is the {obj} {color}?", "what kind of {obj} is this?", "why is the {obj} here?",
    "which side of the picture is the {obj} on?", "who is holding the {obj}?", "does the {obj} look old?",
)  # fmt: skip
_CAPTION_TEMPLATES = (
    "a picture of a {color} {obj} {place}", "a {color} {obj} sitting {place}",
    "two people standing next to a {obj}", "a close up of a {obj} {place}",
    "a {obj} that is {color} and white", "an old {obj} parked {place}",
)  # fmt: skip


def vqa_corpus() -> list[str]:
    """A deterministic corpus of a few thousand short lines in the text shapes the pipelines produce.

    Every printable ASCII character occurs in it (one line lists them), so character-level fallbacks
    cover any ASCII input, including the backslash of UnifiedQA's literal ``\\n`` separator.
    """
    lines: list[str] = [
        "".join(chr(c) for c in range(32, 127)),
        "yes no 0 1 2 3 4 5 6 7 8 9 10 11 12 20 100 1000 2024 3.5 10:30",
        "Please reason the answer of the questions according to the given contexts.",
        "Please answer the question according to the above context.",
    ]
    for i, (obj, color, place) in enumerate(itertools.product(_OBJECTS, _COLORS, _PLACES)):
        question = _QUESTION_TEMPLATES[i % len(_QUESTION_TEMPLATES)].format(obj=obj, color=color)
        caption = _CAPTION_TEMPLATES[i % len(_CAPTION_TEMPLATES)].format(obj=obj, color=color, place=place)
        answer = (color, obj, "yes", "no", str(i % 10))[i % 5]
        if i % 4 == 0:
            lines.append(f"{question} \\n {caption}.")  # UnifiedQA passage: literal backslash-n
        elif i % 4 == 1:
            lines.append(f"answer: {answer}  context: {caption.capitalize()}.")  # question generation
        elif i % 4 == 2:
            lines.append(
                f"Contexts: {caption.capitalize()}.\nQuestion: {question.capitalize()}\nAnswer: {answer}\n"
            )
        else:
            lines.append(f"Context: {caption}\n===\nQ: {question}\nA: {answer}\n\n===\n")
    return lines


def _unused_names(pattern: str, taken: set[str], start: int = 0) -> Iterable[str]:
    """Synthetic filler entries ``pattern.format(n)`` for n = start, start+1, ..., skipping taken ones."""
    for n in itertools.count(start):
        name = pattern.format(n)
        if name not in taken:
            yield name


# ---------------------------------------------------------------------------------------------------
# WordPiece (BLIP's BERT tokenizer)


def wordpiece_vocab(
    words: Sequence[str] = VQA_WORDS,
    *,
    size: int | None = None,
    num_leading_unused: int = 0,
    suffixes: Sequence[str] = VQA_SUFFIXES,
) -> list[str]:
    """A BERT WordPiece vocabulary (one token per id), optionally padded with ``[unusedN]`` to ``size``.

    Layout: ``[PAD]``, ``num_leading_unused`` ``[unusedN]`` entries, ``[UNK] [CLS] [SEP] [MASK]``, the
    printable ASCII characters and their ``##`` continuations, ``words`` (deduplicated, lower-cased) and
    ``##suffix`` pieces, then filler. With 0 leading entries the specials are ids 0..4; with 99 they sit
    where bert-base-uncased has them (0, 100, 101, 102, 103).
    """
    tokens = ["[PAD]"] + [f"[unused{n}]" for n in range(num_leading_unused)]
    tokens += ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # BERT's pre-tokenizer splits on whitespace and punctuation; every other character can continue a word.
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens += chars + ["##" + c for c in chars if c.isalnum()]
    tokens += [w.lower() for w in words] + ["##" + s for s in suffixes]
    tokens = list(dict.fromkeys(tokens))  # deduplicate, keep first occurrence
    if size is not None:
        if size < len(tokens):
            raise ValueError(f"a WordPiece vocabulary of {size} cannot hold the {len(tokens)} base tokens")
        tokens += itertools.islice(
            _unused_names("[unused{}]", set(tokens), num_leading_unused), size - len(tokens)
        )
    return tokens


def write_wordpiece_vocab(path: Path, tokens: Sequence[str]) -> Path:
    """Write a BERT ``vocab.txt`` (one token per line, line number = id)."""
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    return path


def build_blip_bert_tokenizer(
    *,
    words: Sequence[str] = VQA_WORDS,
    total_size: int | None = None,
    num_leading_unused: int = 0,
    model_max_length: int = 512,
) -> BertTokenizer:
    """BLIP's tokenizer: uncased BERT WordPiece plus ``[DEC]`` (bos) and ``[ENC]`` as the last two ids.

    ``total_size`` counts the two added tokens (30524 for the real BLIP vocabulary); ``None`` keeps the
    natural size of ``words``.
    """
    base_size = None if total_size is None else total_size - 2
    tokens = wordpiece_vocab(words, size=base_size, num_leading_unused=num_leading_unused)
    tokenizer = BertTokenizer(
        vocab={token: i for i, token in enumerate(tokens)},
        do_lower_case=True,
        model_max_length=model_max_length,
    )
    # As in BLIP (LAVIS init_tokenizer, HF hub files): bos_token [DEC], then [ENC] as an extra special token.
    tokenizer.add_special_tokens(
        {"bos_token": BLIP_DECODER_TOKEN, "additional_special_tokens": [BLIP_ENCODER_TOKEN]}
    )
    ids = tokenizer.convert_tokens_to_ids([BLIP_DECODER_TOKEN, BLIP_ENCODER_TOKEN])
    assert ids == [len(tokens), len(tokens) + 1], ids
    if total_size is not None and len(tokenizer) != total_size:
        raise AssertionError(f"BLIP tokenizer has {len(tokenizer)} entries, wanted {total_size}")
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# SentencePiece unigram (T5)

T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2


def train_sentencepiece_unigram(
    corpus: Sequence[str] | None = None,
    *,
    vocab_size: int = 500,
    normalization_rule_name: str = "nmt_nfkc",
) -> bytes:
    """A serialized SentencePiece unigram ModelProto with exactly ``vocab_size`` pieces, T5 ids.

    ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, no bos (T5's layout). Trained single-threaded (so the
    result is reproducible) with ``hard_vocab_limit=False``; if the corpus supports fewer pieces, the
    proto is padded with synthetic ``▁<unusedN>`` pieces scored far below every trained piece.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    lines = list(corpus if corpus is not None else vqa_corpus())
    trained_size = min(vocab_size, 2000)  # beyond that a small corpus only adds noise; pad instead
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=trained_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        normalization_rule_name=normalization_rule_name,
        pad_id=T5_PAD_ID,
        eos_id=T5_EOS_ID,
        unk_id=T5_UNK_ID,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    if len(proto.pieces) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(proto.pieces)} pieces the corpus needs")
    if len(proto.pieces) < vocab_size:
        lowest = min(piece.score for piece in proto.pieces)
        taken = {piece.piece for piece in proto.pieces}
        for n, name in enumerate(
            itertools.islice(_unused_names("▁<unused{}>", taken), vocab_size - len(proto.pieces))
        ):
            piece = proto.pieces.add()
            piece.piece = name
            piece.score = lowest - 1000.0 - n * 1e-3
            piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    proto.trainer_spec.vocab_size = vocab_size
    return proto.SerializeToString()


def t5_tokenizer_from_spm(
    spm_model: bytes, *, extra_ids: int = 100, model_max_length: int = 512
) -> T5Tokenizer:
    """Wrap a serialized SentencePiece proto into a (fast) ``T5Tokenizer`` with ``extra_ids`` sentinels.

    transformers v5 ignores ``T5Tokenizer(vocab_file=...)`` (it builds a 4-piece vocabulary), so the
    pieces, scores and normalizer charsmap are passed explicitly, as its own converter does.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    pieces = [(piece.piece, piece.score) for piece in proto.pieces]
    if [p for p, _ in pieces[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise ValueError(f"not a T5 layout: first pieces are {[p for p, _ in pieces[:3]]}")
    # T5 appends the sentinels in reverse: <extra_id_0> gets the last id.
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(extra_ids))]
    charsmap = proto.normalizer_spec.precompiled_charsmap or None
    return T5Tokenizer(
        vocab=pieces,
        _spm_precompiled_charsmap=charsmap,
        extra_ids=extra_ids,
        model_max_length=model_max_length,
    )


def with_whole_word_pieces(spm_model: bytes, words: Iterable[str], score: float = -5.0) -> bytes:
    """Replace the ``▁<unusedN>`` padding of a trained proto with one ``▁word`` piece per new word.

    A small training corpus cannot teach SentencePiece a real-size vocabulary, so common words come out
    as several pieces. A whole-word piece scored above any split of the word into trained pieces makes
    each listed word one token, as frequent words are with T5's real vocabulary. Unused padding beyond
    the listed words stays; the size never changes.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    taken = {piece.piece for piece in proto.pieces}
    fresh = iter(dict.fromkeys(f"▁{w}" for w in words if f"▁{w}" not in taken))
    for index, piece in enumerate(proto.pieces):
        if piece.piece.startswith("▁<unused"):
            name = next(fresh, None)
            if name is None:
                break
            piece.piece = name
            piece.score = score - index * 1e-6  # a strict order keeps Viterbi ties deterministic
    return proto.SerializeToString()


def build_t5_tokenizer(
    corpus: Sequence[str] | None = None,
    *,
    sp_vocab_size: int = 500,
    extra_ids: int = 10,
    model_max_length: int = 512,
    whole_words: Sequence[str] = (),
) -> T5Tokenizer:
    """A T5 tokenizer of ``sp_vocab_size + extra_ids`` entries (real: 32,000 + 100); ``whole_words``
    become single pieces (:func:`with_whole_word_pieces`) as far as the padding allows."""
    model = train_sentencepiece_unigram(corpus, vocab_size=sp_vocab_size)
    if whole_words:
        model = with_whole_word_pieces(model, whole_words)
    tokenizer = t5_tokenizer_from_spm(
        model,
        extra_ids=extra_ids,
        model_max_length=model_max_length,
    )
    if len(tokenizer) != sp_vocab_size + extra_ids:
        raise AssertionError(f"T5 tokenizer has {len(tokenizer)} entries, wanted {sp_vocab_size + extra_ids}")
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Byte-level BPE (OPT, CLIP)

# A small corpus supports only so many merges with a frequency of 2 or more; the rest of a real-size
# vocabulary is filler.
MAX_LEARNT_MERGES = 3000


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, in its canonical order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return {b: mapping[b] for b in printable + [b for b in range(256) if b not in printable]}


def _learn_bpe_merges(
    words: Iterable[Sequence[str]], num_merges: int, *, min_frequency: int = 2
) -> list[tuple[str, str]]:
    """Learn up to ``num_merges`` BPE merges from pre-tokenized words (each a sequence of symbols).

    Written here rather than taken from the ``tokenizers`` trainer because that trainer breaks ties
    between equally frequent pairs in hash-map order, so two runs can differ. Here the most frequent
    pair wins and ties go to the lexicographically smallest pair. Pair counts are updated only for the
    words a merge touches, which keeps a few thousand merges on a small corpus to about a second.
    """
    counts = collections.Counter(tuple(w) for w in words if len(w) > 0)
    symbols = [list(w) for w in sorted(counts)]
    freqs = [counts[tuple(w)] for w in symbols]
    pair_counts: collections.Counter[tuple[str, str]] = collections.Counter()
    pair_words: dict[tuple[str, str], set[int]] = collections.defaultdict(set)

    def account(index: int, sign: int) -> None:
        word = symbols[index]
        for pair in itertools.pairwise(word):
            pair_counts[pair] += sign * freqs[index]
            if sign > 0:
                pair_words[pair].add(index)

    for index in range(len(symbols)):
        account(index, +1)

    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        candidates = [(count, pair) for pair, count in pair_counts.items() if count >= min_frequency]
        if not candidates:
            break
        best = min(candidates, key=lambda item: (-item[0], item[1]))[1]
        merges.append(best)
        merged = best[0] + best[1]
        for index in sorted(pair_words.pop(best, ())):
            account(index, -1)
            word, out, i = symbols[index], [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            symbols[index] = out
            account(index, +1)
        for pair in [p for p, c in pair_counts.items() if c <= 0]:
            del pair_counts[pair]
    return merges


def _pretokenize(
    normalizer, pre_tokenizer, corpus: Iterable[str], end_of_word_suffix: str = ""
) -> list[list[str]]:
    """Split a corpus into words of byte-level symbols exactly as a ``tokenizers`` pipeline would."""
    words = []
    for line in corpus:
        text = normalizer.normalize_str(line) if normalizer is not None else line
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            symbols = list(word)
            if symbols and end_of_word_suffix:
                symbols[-1] += end_of_word_suffix
            words.append(symbols)
    return words


def _bpe_vocab(
    front: Sequence[str],
    alphabet: Sequence[str],
    merges: Sequence[tuple[str, str]],
    back: Sequence[str],
    size: int,
    filler: str,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary of exactly ``size``: front specials, alphabet, merge products, filler, back."""
    tokens = list(dict.fromkeys([*front, *alphabet]))
    kept_merges: list[tuple[str, str]] = []
    room = max(size - len(tokens) - len(back), 0)
    known = set(tokens)
    for left, right in merges:
        product = left + right
        if product not in known:
            if room == 0:
                break  # later merges only build on earlier ones, so truncating here stays consistent
            room -= 1
            known.add(product)
            tokens.append(product)
        kept_merges.append((left, right))  # kept even when its product exists: BPE applies merges in order
    if len(tokens) + len(back) > size:
        raise ValueError(f"a BPE vocabulary of {size} cannot hold the {len(tokens) + len(back)} base entries")
    taken = set(tokens) | set(back)
    tokens += itertools.islice(_unused_names(filler, taken), size - len(tokens) - len(back))
    tokens += back
    return {token: i for i, token in enumerate(tokens)}, kept_merges


def opt_bpe_vocab(
    corpus: Sequence[str] | None = None, *, vocab_size: int = 600
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OPT's byte-level BPE layout: ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, bytes, merges, filler."""
    from tokenizers import pre_tokenizers

    front = ["<s>", "<pad>", "</s>", "<unk>"]
    alphabet = list(_bytes_to_unicode().values())
    words = _pretokenize(
        None, pre_tokenizers.ByteLevel(add_prefix_space=False), corpus if corpus is not None else vqa_corpus()
    )
    num_merges = max(vocab_size - len(front) - len(alphabet), 0)
    merges = _learn_bpe_merges(words, min(num_merges, MAX_LEARNT_MERGES))
    return _bpe_vocab(front, alphabet, merges, [], vocab_size, "madeupword{:04d}")


def build_opt_tokenizer(
    corpus: Sequence[str] | None = None,
    *,
    vocab_size: int = 600,
    model_max_length: int = 2048,
) -> GPT2Tokenizer:
    """OPT's tokenizer: byte-level BPE, ``</s>`` as bos and eos (prepended to every text), left padding."""
    vocab, merges = opt_bpe_vocab(corpus, vocab_size=vocab_size)
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_prefix_space=False,
        padding_side="left",
        model_max_length=model_max_length,
    )
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"OPT tokenizer has {len(tokenizer)} entries, wanted {vocab_size}")
    return tokenizer


CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def clip_bpe_vocab(
    corpus: Sequence[str] | None = None, *, vocab_size: int = 600
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE layout: bytes, bytes + ``</w>``, merge products, filler, then bos and eos (last ids)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    byte_chars = list(_bytes_to_unicode().values())
    alphabet = byte_chars + [c + "</w>" for c in byte_chars]
    back = [CLIP_BOS, CLIP_EOS]
    # Same normalizer and pre-tokenizer as transformers' CLIPTokenizer, so the merges fit how it splits.
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words = _pretokenize(
        normalizer, pre_tokenizer, corpus if corpus is not None else vqa_corpus(), end_of_word_suffix="</w>"
    )
    num_merges = max(vocab_size - len(alphabet) - len(back), 0)
    merges = _learn_bpe_merges(words, min(num_merges, MAX_LEARNT_MERGES))
    return _bpe_vocab([], alphabet, merges, back, vocab_size, "<|unused{}|>")


def build_clip_tokenizer(
    corpus: Sequence[str] | None = None,
    *,
    vocab_size: int = 600,
    model_max_length: int = 77,
) -> CLIPTokenizer:
    """CLIP's tokenizer: lower-cased BPE with ``</w>`` word ends; pad = eos = ``<|endoftext|>`` (last id)."""
    vocab, merges = clip_bpe_vocab(corpus, vocab_size=vocab_size)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"CLIP tokenizer has {len(tokenizer)} entries, wanted {vocab_size}")
    return tokenizer


def build_real_size_tokenizer(family: str):
    """A tokenizer with the exact length of the real checkpoints' (see :data:`REAL_TOKENIZER_SIZES`)."""
    size = REAL_TOKENIZER_SIZES[family]
    if family == "blip_bert":
        return build_blip_bert_tokenizer(total_size=size, num_leading_unused=99)
    if family == "t5":
        return build_t5_tokenizer(sp_vocab_size=size - 100, extra_ids=100)
    if family == "opt":
        return build_opt_tokenizer(vocab_size=size)
    if family == "clip":
        return build_clip_tokenizer(vocab_size=size)
    raise KeyError(f"unknown tokenizer family {family!r}; known: {sorted(REAL_TOKENIZER_SIZES)}")
