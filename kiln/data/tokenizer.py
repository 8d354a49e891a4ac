"""Tokenizers for `kiln data prepare`: byte-level, a locally trained BPE, a Hugging Face `tokenizer.json`,
or a `transformers` tokenizer directory (`save_pretrained` output; its EOS token is taken from it).

All three share one small interface (`encode`, `decode`, `eos_id`, `vocab_size`, `name`) so that
prepare, inspect and generation never care which one a dataset used. BPE and Hugging Face
tokenizers are stored beside the shards as `tokenizer.json`; the manifest records their sha256.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from kiln.errors import KilnError

TOKENIZER_FILE = "tokenizer.json"
EOS_TEXT = "<|endoftext|>"
# Names that Hugging Face tokenizers use for the end-of-document token, most specific first.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class Tokenizer:
    """The interface every kiln tokenizer implements."""

    name: str
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def to_str(self) -> Optional[str]:
        """The serialized form stored beside the shards (None: nothing to store)."""
        return None

    def identity(self) -> dict:
        serial = self.to_str()
        digest = hashlib.sha256((serial if serial is not None else self.name).encode()).hexdigest()
        return {"name": self.name, "eos_id": self.eos_id, "vocab_size": self.vocab_size,
                "file": TOKENIZER_FILE if serial is not None else None, "sha256": digest}


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus EOS = 256: no training, no files, works on any text."""

    name = "byte"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (trained BPE or a user's tokenizer.json) with a known EOS token."""

    def __init__(self, tok, name: str, eos_id: Optional[int] = None):
        self.tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id if eos_id is not None else _find_eos(tok, name)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def to_str(self) -> str:
        return self.tok.to_str()


def _find_eos(tok, name: str) -> int:
    for text in EOS_CANDIDATES:
        idx = tok.token_to_id(text)
        if idx is not None:
            return idx
    raise KilnError(f"tokenizer {name}: no end-of-document token found (looked for {', '.join(EOS_CANDIDATES)})")


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Train a byte-level BPE with the `tokenizers` library; `<|endoftext|>` is id 0."""
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise KilnError(f"tokenizer bpe:{vocab_size}: vocab must be at least 258 (256 bytes + EOS + merges)")
    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, f"bpe:{vocab_size}")


def parse_spec(spec: str) -> tuple[str, object]:
    """'byte' -> ('byte', None); 'bpe:2048' -> ('bpe', 2048); a directory with tokenizer_config.json ->
    ('transformers', dir); anything else is a tokenizer.json (or a directory holding one)."""
    if spec == "byte":
        return "byte", None
    if spec.startswith("bpe:"):
        try:
            return "bpe", int(spec[4:])
        except ValueError:
            raise KilnError(f"tokenizer {spec!r}: expected bpe:VOCAB with an integer VOCAB") from None
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        return "transformers", path
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise KilnError(f"tokenizer {spec!r}: not 'byte', 'bpe:VOCAB', or an existing tokenizer.json")
    return "file", path


def from_file(path: Path, name: Optional[str] = None, eos_id: Optional[int] = None) -> HFTokenizer:
    from tokenizers import Tokenizer as RawTokenizer

    try:
        tok = RawTokenizer.from_file(str(path))
    except Exception as exc:
        raise KilnError(f"tokenizer {path}: cannot load ({exc})") from None
    if eos_id is None:
        eos_id = _configured_eos(tok, Path(path).parent / "tokenizer_config.json")
    return HFTokenizer(tok, name or f"file:{Path(path).name}", eos_id)


def _configured_eos(tok, config: Path) -> Optional[int]:
    """The `eos_token` a transformers tokenizer_config.json beside the tokenizer.json names, if any."""
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return tok.token_to_id(eos) if isinstance(eos, str) else None


def from_transformers(directory: Path) -> HFTokenizer:
    """A `transformers` tokenizer directory, through its fast (Rust `tokenizers`) backend, which is what
    kiln stores beside the shards; EOS is the tokenizer's own `eos_token` when it names one."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise KilnError(f"tokenizer {directory}: a transformers tokenizer directory needs `transformers` "
                        f"(pip install 'kiln[hf]')") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:
        raise KilnError(f"tokenizer {directory}: transformers cannot load it ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise KilnError(f"tokenizer {directory}: no fast tokenizer (tokenizer.json) can be built from it")
    eos = tok.eos_token_id if isinstance(getattr(tok, "eos_token_id", None), int) else None
    return HFTokenizer(backend, f"hf:{Path(directory).name}", eos)


def from_identity(identity: dict, data_dir: str | os.PathLike) -> Tokenizer:
    """Rebuild the tokenizer a manifest describes, checking the stored file's hash."""
    if identity["name"] == "byte":
        return ByteTokenizer()
    name = identity.get("file") or TOKENIZER_FILE
    if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
        raise KilnError(f"{data_dir}: tokenizer file {str(name)[:60]!r} is not a file name inside the directory")
    path = Path(data_dir) / name
    if not path.is_file():
        raise KilnError(f"{data_dir}: tokenizer file {path.name} is missing")
    tok = from_file(path, identity["name"], identity["eos_id"])
    if hashlib.sha256(tok.to_str().encode()).hexdigest() != identity["sha256"]:
        raise KilnError(f"{path}: tokenizer does not match the sha256 recorded in the manifest")
    return tok


def load_tokenizer(data_dir: str) -> Tokenizer:
    """The tokenizer of a `kiln data prepare` output directory."""
    from kiln.data.shards import read_manifest

    return from_identity(read_manifest(data_dir)["tokenizer"], data_dir)


RUN_IDENTITY = "tokenizer.identity.json"


def keep_in_run(data_dir: str, run_dir: Path, resuming: bool) -> None:
    """Keep a copy of the data's tokenizer in the run directory, so `kiln generate` and `kiln convert`
    use what the run trained with even after data_dir is prepared again. A run that resumes refuses
    data whose tokenizer is not the one it trained with."""
    from kiln.data.shards import read_manifest

    identity = read_manifest(data_dir)["tokenizer"]
    kept = run_dir / RUN_IDENTITY
    if kept.is_file():
        old = json.loads(kept.read_text())
        if resuming and old.get("sha256") != identity["sha256"]:
            raise KilnError(f"{data_dir}: its tokenizer ({identity['name']}, sha256 {identity['sha256'][:12]}) is not "
                            f"the one this run trained with ({old.get('name')}, sha256 {str(old.get('sha256'))[:12]}, "
                            f"kept in {run_dir}); prepare the new data elsewhere, or start a new train.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    if identity.get("file"):
        from_identity(identity, data_dir)  # the file matches its recorded hash before it is copied
        shutil.copyfile(Path(data_dir) / identity["file"], run_dir / (TOKENIZER_FILE + ".tmp"))
        os.replace(run_dir / (TOKENIZER_FILE + ".tmp"), run_dir / TOKENIZER_FILE)
        identity = dict(identity, file=TOKENIZER_FILE)
    tmp = kept.with_name(kept.name + ".tmp")
    tmp.write_text(json.dumps(identity, indent=1) + "\n")
    os.replace(tmp, kept)


def run_tokenizer(run_dir: Path, data_dir: Optional[str]) -> Tokenizer:
    """The tokenizer a run trained with: its own copy, else (runs from before kiln kept one) data_dir's."""
    kept = Path(run_dir) / RUN_IDENTITY
    if kept.is_file():
        return from_identity(json.loads(kept.read_text()), run_dir)
    if not data_dir:
        raise KilnError(f"{run_dir}: this run has no tokenizer (synthetic data): use --prompt-ids")
    return load_tokenizer(data_dir)
