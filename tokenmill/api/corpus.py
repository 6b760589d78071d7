"""CorpusFilter: organic documents in, a filtered and decontaminated document dataset out."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tokenmill.api.base import ApiModel
from tokenmill.api.common import CommonSpec, DataSource, NamedDataSource
from tokenmill.api.fields import Fraction, PositiveFraction, ShortText, StoreUri
from tokenmill.api.kinds import KindDescriptor, Resource
from tokenmill.api.synthetic import GENERATOR_API_KEY_ENV, Generator

PHI4_LANGUAGES = ["en", "de", "es", "fr", "pt", "it", "hi", "ja"]
NON_STEM_TOPICS = ["arts", "history", "travel", "culture", "entertainment"]
PHI4_BENCHMARKS = [
    "mmlu", "mmlu-pro", "gsm8k", "math", "humaneval", "mbpp", "gpqa", "arc-easy",
    "arc-challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "commonsenseqa",
    "medqa", "agieval", "arena-hard", "mt-bench",
]


class LanguageFilter(ApiModel):
    """Language identification: keep documents in the listed languages."""

    languages: list[ShortText] = Field(default_factory=lambda: list(PHI4_LANGUAGES), min_length=1, max_length=176)
    """ISO 639-1 codes to keep (the identifier knows 176 languages)."""
    threshold: Fraction = 0.65
    """Minimum confidence of the top language for a document to be kept."""
    model: DataSource | None = None
    """Language-identification model (for example a fastText lid.176 file) at a URI; the built-in
    character n-gram identifier is used when omitted."""


class NonStemPass(ApiModel):
    """A second pass that keeps good non-STEM documents the main classifier under-rewards."""

    enabled: bool = True
    """Run the pass."""
    topics: list[ShortText] = Field(default_factory=lambda: list(NON_STEM_TOPICS), min_length=1, max_length=64)
    """Topics the pass keeps."""
    keep_fraction: PositiveFraction = 0.05
    """Fraction of documents on those topics to keep, best first."""


class QualityAnnotator(ApiModel):
    """An LLM scores a sample of the inputs; the scores become the classifier's annotations."""

    generator: Generator
    """The model that scores documents and the engine that serves it."""
    sample_documents: int = Field(default=10000, ge=10, le=10_000_000)
    """Documents to score, taken evenly from every input shard."""
    prompt: Literal["educational-value-v1"] = "educational-value-v1"
    """Versioned prompt: educational value and reasoning depth, each 0 to 5 (FineWeb-Edu style);
    the label is their mean over 5."""


class QualityFilter(ApiModel):
    """A small non-LLM classifier trained on LLM-written annotations picks the best documents."""

    cel_rules = (
        {
            "rule": "has(self.keepFraction) != has(self.threshold)",
            "message": "set exactly one of keepFraction or threshold",
        },
        {
            "rule": "(has(self.annotations) ? 1 : 0) + (has(self.classifier) ? 1 : 0) + (has(self.annotate) ? 1 : 0) == 1",
            "message": "set exactly one of annotations (labelled documents), annotate (an LLM labels a sample) "
                       "or classifier (reuse a saved one)",
        },
    )

    annotations: DataSource | None = None
    """Documents with LLM-written quality labels (text, and label in [0, 1] as a column or in meta;
    optionally topic) to train the classifier and the non-STEM topic classifier on."""
    classifier: StoreUri | None = None
    """A classifier an earlier CorpusFilter saved (its <output>/quality), reused instead of training one."""
    annotate: QualityAnnotator | None = None
    """Have an LLM label a sample of the inputs, then train on those labels."""
    keep_fraction: PositiveFraction | None = None
    """Keep this fraction of documents, best first."""
    threshold: Fraction | None = None
    """Keep documents whose score is at least this."""
    non_stem: NonStemPass = Field(default_factory=NonStemPass)
    """The non-STEM pass."""


class Deduplication(ApiModel):
    """Near-duplicate removal with MinHash over word n-grams and locality-sensitive hashing."""

    cel_rules = (
        {
            "rule": "self.numPermutations % self.bands == 0",
            "message": "numPermutations must be a multiple of bands",
        },
    )

    enabled: bool = True
    """Run deduplication."""
    ngram: int = Field(default=5, ge=1, le=32)
    """Word n-gram size of the shingles."""
    num_permutations: int = Field(default=128, ge=16, le=1024)
    """MinHash signature length."""
    bands: int = Field(default=16, ge=1, le=512)
    """LSH bands; rows per band is numPermutations / bands."""
    jaccard_threshold: PositiveFraction = 0.8
    """Documents at least this similar are duplicates; one of each cluster is kept."""


class Decontamination(ApiModel):
    """The hybrid 13-gram / 7-gram rule of the Phi-4 report against benchmark items."""

    cel_rules = (
        {
            "rule": "self.contaminatedThreshold >= self.infoThreshold",
            "message": "contaminatedThreshold must be at least infoThreshold",
        },
    )

    benchmarks: list[NamedDataSource] = Field(min_length=1, max_length=128)
    """Benchmark item datasets (field text) to decontaminate against."""
    allow_list: DataSource | None = None
    """13-grams common in ordinary text (answer-option boilerplate) that never mark a document."""
    ngram: int = Field(default=13, ge=8, le=50)
    """A document sharing any such n-gram with an item (not allow-listed) is contaminated."""
    info_ngram: int = Field(default=7, ge=3, le=20)
    """N-gram size of the ratio test."""
    info_threshold: Fraction = 0.2
    """max shared/min(#doc n-grams, #item n-grams) above this marks a document partial (kept, reported)."""
    contaminated_threshold: Fraction = 0.5
    """max ratio at or above this marks a document contaminated (removed)."""
    allow_list_min_documents: int | None = Field(default=None, ge=1)
    """Also allow-list every benchmark n-gram found in at least this many distinct input documents
    (common in ordinary text); omitted allow-lists only allowList's n-grams."""


class OutlierFilter(ApiModel):
    """Drops corrupt and binary text by length, character and n-gram statistics and compression ratio."""

    cel_rules = (
        {"rule": "self.minChars < self.maxChars", "message": "minChars must be less than maxChars"},
        {
            "rule": "self.minCompressionRatio < self.maxCompressionRatio",
            "message": "minCompressionRatio must be less than maxCompressionRatio",
        },
    )

    min_chars: int = Field(default=200, ge=0)
    """Shorter documents are dropped."""
    max_chars: int = Field(default=1_000_000, ge=1)
    """Longer documents are dropped."""
    max_non_text_fraction: Fraction = 0.3
    """Largest fraction of characters that are neither letters, digits, punctuation nor white space."""
    max_top_ngram_fraction: Fraction = 0.2
    """Largest share of the text covered by its most frequent word 3-gram (repetition)."""
    min_compression_ratio: float = Field(default=1.5, gt=0.0)
    """Smallest raw/zlib size ratio; lower means random or binary bytes."""
    max_compression_ratio: float = Field(default=12.0, gt=0.0)
    """Largest raw/zlib size ratio; higher means degenerate repetition."""


class CorpusFilterSpec(CommonSpec):
    """Filters raw documents into the organic pretraining corpus."""

    inputs: list[NamedDataSource] = Field(min_length=1, max_length=256)
    """Raw document datasets (fields id, text, source, lang, meta)."""
    languages: LanguageFilter = Field(default_factory=LanguageFilter)
    """Language identification."""
    quality: QualityFilter | None = None
    """Quality classifier; omitted keeps every document that passes the other filters."""
    dedup: Deduplication = Field(default_factory=Deduplication)
    """Near-duplicate removal."""
    decontamination: Decontamination | None = None
    """Benchmark decontamination; omitted skips it (the validator warns in recipes that train on the output)."""
    outliers: OutlierFilter = Field(default_factory=OutlierFilter)
    """Corrupt and binary text removal."""
    extraction: Literal["preserve-structure", "plain"] = "preserve-structure"
    """preserve-structure keeps TeX/MathML, code blocks, tables and thread structure; plain collapses them."""
    keep_dropped: bool = False
    """Also write the dropped documents, with the step, reason and evidence in meta, to <output>/dropped."""


class CorpusFilter(Resource):
    kind: Literal["CorpusFilter"]
    spec: CorpusFilterSpec


def _needs_gpus(spec: CorpusFilterSpec) -> bool:
    """Only an annotator served on the cluster (vllm, torch) needs GPUs."""
    annotate = spec.quality.annotate if spec.quality is not None else None
    return annotate is not None and annotate.generator.engine in ("vllm", "torch")


DESCRIPTOR = KindDescriptor(
    kind="CorpusFilter",
    plural="corpusfilters",
    short_names=("cf",),
    prefix="cf",
    cli_name="corpus-filter",
    workload_module="tokenmill.trainer.curate.workload",
    output="dataset",
    resource_model=CorpusFilter,
    spec_model=CorpusFilterSpec,
    dataset_fields=(
        "spec.inputs", "spec.quality.annotations", "spec.decontamination.benchmarks", "spec.decontamination.allowList",
    ),
    file_fields=("spec.languages.model",),
    model_fields=("spec.quality.annotate.generator.model",),
    secret_key_env={"spec.quality.annotate.generator.apiKeySecret": GENERATOR_API_KEY_ENV},
    needs_gpus=_needs_gpus,
    dataset_types=lambda spec: frozenset({"documents"}),
)
