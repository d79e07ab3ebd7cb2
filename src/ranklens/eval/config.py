"""The configs of `ranklens eval sae` and `ranklens eval lorsa` (no torch here: the command line is built from
them). Unset fields come from the training run when the directory is a ranklens run. The field makers are shared
with the other jobs that read a trained dictionary."""

from __future__ import annotations

from pydantic import Field

from ranklens.config import Config


def dtype_field():
    return Field("auto", description="the model's compute dtype: auto, float32, bfloat16 or float16")


def device_field():
    return Field("cpu", description="torch device: cpu, cuda, ...")


def model_field():
    return Field(None, description="the model (default: the one the dictionary was trained on)")


def corpus_field():
    return Field(None, description="evaluate on this corpus from its start (default: the training run's held-out "
                                   "documents, those after its training data)")


def seed_field():
    return Field(1, description="document order of --corpus")


def context_field():
    return Field(None, ge=2, description="tokens per document (default: the training run's)")


def eval_tokens_field():
    return Field(100_000, gt=0, description="held-out tokens for FVU, L0 and dead features")


def lm_eval_tokens_field():
    return Field(16_384, ge=0, description="held-out next-token predictions scored by the spliced LM loss (0: skip "
                                           "it)")


def results_field():
    return Field(None, description="write the results (JSON) to this file (default: DIR/eval.json)")


class SAEEvalConfig(Config):
    model: str | None = model_field()
    site: str | None = Field(None, description="the site (default: the training run's; required for an SAELens "
                                               "or LlamaScope directory)")
    corpus: str | None = corpus_field()
    seed: int = seed_field()
    eval_tokens: int = eval_tokens_field()
    lm_eval_tokens: int = lm_eval_tokens_field()
    context_length: int | None = context_field()
    dtype: str = dtype_field()
    device: str = device_field()
    results: str | None = results_field()


class LorsaEvalConfig(Config):
    model: str | None = model_field()
    corpus: str | None = corpus_field()
    seed: int = seed_field()
    eval_tokens: int = eval_tokens_field()
    lm_eval_tokens: int = lm_eval_tokens_field()
    context_length: int | None = context_field()
    dtype: str = dtype_field()
    device: str = device_field()
    results: str | None = results_field()
