"""The configs of `ranklens autointerp explain|score|compare` (no torch here: the command line is built from them).

One flat config per command, each field one ``--flag``; unknown keys are refused (``ranklens.config.Config``).
The judge is any OpenAI-compatible chat endpoint: ``--base-url`` and ``--model``, the key read from the environment
variable named by ``--api-key-env`` (never from a flag or a file, so it stays out of configs and shell history).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ranklens.config import Config

METHODS = ("simulation", "detection", "fuzzing")


class JudgeConfig(Config):
    base_url: str | None = Field(None, description="the judge's OpenAI-compatible endpoint, e.g. "
                                                    "http://127.0.0.1:8000/v1 or https://api.openai.com/v1")
    model: str | None = Field(None, description="the judge model's name at that endpoint")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the API key (a local "
                                                           "server without keys needs none)")
    concurrency: int = Field(4, ge=1, le=256, description="requests in flight at once")
    max_retries: int = Field(4, ge=0, le=20, description="retries of a failed request (connection errors, timeouts, "
                                                         "429 and 5xx), with exponential backoff")
    retry_base_seconds: float = Field(1.0, ge=0, description="first backoff; doubled at each retry")
    timeout: float = Field(120.0, gt=0, description="seconds to wait for one response")
    seed: int = Field(0, description="seed of the feature sample and the shuffles, and the judge's sampling seed")
    send_seed: bool = Field(True, description="send the seed to the judge (temperature is always 0); turn off for "
                                              "a server that rejects it")
    cache: str | None = Field(None, description="directory of the request/response cache (default: "
                                                "OUT/cache); a request already there is never sent again")
    price_input: float = Field(0.0, ge=0, description="price per million prompt tokens, for the cost estimate")
    price_output: float = Field(0.0, ge=0, description="price per million completion tokens")


class ExplainConfig(JudgeConfig):
    features: int = Field(8, ge=1, description="alive features (or heads) sampled at random, seeded")
    feature_ids: list[int] | None = Field(None, description="explain exactly these ids instead (comma-separated)")
    explain_top: int = Field(8, ge=1, description="top activating contexts shown to the explainer (App. D: 8); "
                                                  "the even-ranked ones, the odd-ranked are held out for scoring")
    explain_quantile: int = Field(4, ge=0, description="SAE: interval samples shown too (one per interval, round "
                                                       "robin)")
    before: int = Field(12, ge=0, description="tokens shown before the peak of a context (at most the dashboard's)")
    after: int = Field(4, ge=0, description="tokens shown after it")
    explain_max_tokens: int = Field(60, ge=8, description="longest explanation, in tokens")

    @field_validator("feature_ids", mode="before")
    @classmethod
    def _ids(cls, value):
        if isinstance(value, str):
            return [int(v) for v in value.split(",") if v.strip()]
        return value


class ScoreConfig(ExplainConfig):
    methods: list[Literal["simulation", "detection", "fuzzing"]] = Field(
        ["simulation"], description="scores: simulation (Bills et al.: correlation of predicted with true "
                                    "activations), detection and fuzzing (delphi's, cheaper)")
    score_top: int = Field(4, ge=0, description="held-out top contexts scored (App. D: 4)")
    score_random: int = Field(4, ge=0, description="random held-out contexts scored (App. D: 4)")
    random_baseline: bool = Field(True, description="also score a random explanation (another feature's) so every "
                                                    "score has a floor")

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value


class CompareConfig(ScoreConfig):
    rubric: bool = Field(True, description="also rate each feature 1-5 on the monosemanticity rubric "
                                           "(dimensional-collapse paper App. N.1)")
