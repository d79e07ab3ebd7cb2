"""Typed configs: pydantic models that reject unknown keys, loadable from YAML and overridable from the CLI.

Every job's config is flat (each field is one ``--flag`` and one YAML key) and lives in a module that imports no
torch, so building the command line is fast. Each field carries a ``description``, which is its ``--help`` text, and
its constraints (``gt=0`` and so on), so a bad value is refused before a job writes anything. Fields that many jobs
share come from the groups below (``ModelFields``, ``CorpusFields``) and stay flat all the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ranklens.errors import RanklensError

C = TypeVar("C", bound="Config")

DEFAULT_CONTEXT_LENGTH = 1024  # App. E.2: documents truncated to 1,024 tokens
DTYPE_HELP = "auto (bfloat16 on CPUs with bf16 instructions or on CUDA, else float32), float32, bfloat16 or float16"


# How a corpus is read travels inside its spec, so every reader of the corpus (collect, the stream, the held-out
# text of a store or a run, written to disk as the spec) reads it the same way: `SPEC#FIELD` names the record
# field, a `split:` or `truncate:` prefix the treatment of documents longer than the context (ranklens.data.corpus).
FIELD_SEPARATOR = "#"
LONG_DOCUMENTS = ("auto", "truncate", "split")


def corpus_spec(corpus: str, text_field: str | None = None, long_documents: str = "auto") -> str:
    """`corpus` with a text field and a long-document treatment folded in; idempotent, so a resolved config
    read back gives the same spec."""
    if text_field is not None and not corpus.endswith(FIELD_SEPARATOR + text_field):
        if FIELD_SEPARATOR in corpus.rsplit("/", 1)[-1]:
            raise RanklensError(f"corpus {corpus!r} already names a field; expected it or --text-field "
                                f"{text_field!r}, not both")
        corpus = f"{corpus}{FIELD_SEPARATOR}{text_field}"
    if long_documents != "auto":
        for other in LONG_DOCUMENTS[1:]:
            if other != long_documents and corpus.startswith(other + ":"):
                raise RanklensError(f"corpus {corpus!r} asks for {other} but --long-documents is "
                                    f"{long_documents}; expected one of them")
        if not corpus.startswith(long_documents + ":"):
            corpus = f"{long_documents}:{corpus}"
    return corpus


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, with one-line errors for a missing file, bad YAML or another shape."""
    path = Path(path)
    if not path.is_file():
        raise RanklensError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise RanklensError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RanklensError(f"config file {str(path)!r} is not text (UTF-8)") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise RanklensError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
    return loaded


class Config(BaseModel):
    """Base of every job config: unknown keys are an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def build(cls: type[C], values: dict[str, Any], source: str = "arguments") -> C:
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            first = err.errors()[0]
            loc = [str(p) for p in first["loc"]]
            name = loc[0] if loc else ""
            where = f"{flag(name)} ({'.'.join(loc)})" if name in cls.model_fields else ".".join(loc) or "(top level)"
            if first["type"] == "missing":
                raise RanklensError(f"{flag(name)} is required ({source})") from None
            if first["type"] == "extra_forbidden":
                raise RanklensError(f"unknown option {name!r} in {source}; expected one of "
                                    f"{', '.join(sorted(cls.model_fields))}") from None
            message = first["msg"].removeprefix("Value error, ")
            message = message[:1].lower() + message[1:]
            if not loc:  # a check of several fields together
                raise RanklensError(f"{message} ({source})") from None
            if name in cls.model_fields and len(loc) == 1:
                raise RanklensError(f"{flag(name)} {first.get('input')}: {message} ({source})") from None
            raise RanklensError(f"bad value in {source}: {where}: {message} (got {first.get('input')!r})") from None

    @classmethod
    def load(cls: type[C], path: str | Path | None = None, **overrides: Any) -> C:
        """``defaults_for`` (a preset's values, say), then the YAML file's values (if given), then the non-None
        overrides (the CLI's flags)."""
        values: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build({**cls.defaults_for(values), **values}, source=str(path) if path else "arguments")

    @classmethod
    def defaults_for(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Values layered under a YAML file and the flags, given what those hold (a preset they name, say); none
        unless a config class has presets."""
        return {}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ModelFields(Config):
    """The language model a job runs and where."""

    model: str = Field("smollm2-135m", description="embedded model name (see `ranklens models`), Hugging Face id "
                                                   "or local model directory")
    dtype: str = Field("auto", description=f"the model's compute dtype: {DTYPE_HELP}")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, ...")


class CorpusFields(Config):
    """The text a job reads, in which order, cut how."""

    corpus: str = Field("default", description="embedded corpus (default, prose, code, zh, or several joined with "
                                               "+), a .txt/.jsonl/.jsonl.zst/.parquet file or directory, or hf:NAME")
    seed: int = Field(0, description="seed of the document order (and of everything else random in the job)")
    context_length: int = Field(DEFAULT_CONTEXT_LENGTH, ge=2,
                                description="tokens per document, bos included (App. E.2 truncation)")
    text_field: str | None = Field(None, description="the field documents are read from in .jsonl/.parquet/hf: "
                                                     "corpora (a string field, or a list of token ids used as they "
                                                     "are); unset: text, else input_ids")
    long_documents: Literal["auto", "truncate", "split"] = Field(
        "auto", description="documents longer than the context: truncate to one context (App. E.2, the paper's "
                            "experiments), split into consecutive contexts (every token used), or auto (split a "
                            "single .txt file, truncate every other corpus)")

    @model_validator(mode="after")
    def _fold_into_corpus(self):  # noqa: ANN202 - pydantic validator
        """Fold the field and the long-document treatment into the corpus spec every reader gets."""
        folded = corpus_spec(self.corpus, self.text_field, self.long_documents)
        if folded != self.corpus:
            object.__setattr__(self, "corpus", folded)
        return self
