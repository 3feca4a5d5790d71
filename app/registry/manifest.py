"""The model manifest: everything model-specific, as data.

A model lives in ``<models_dir>/<name>/<version>/`` as ``model.onnx`` plus ``manifest.json``.
The worker reads nothing about a model from Python code: tensor names, input geometry,
windowing, labels, thresholds and saliency methods all come from here. The same schema is
used by the registry (API side), the workers and the training/export scripts.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Task(StrEnum):
    """What a model predicts."""

    SEGMENTATION = "segmentation"
    CLASSIFICATION = "classification"


class OutputRole(StrEnum):
    """How the worker interprets a graph output."""

    LOGITS = "logits"  # segmentation: (N, K, H, W) per-class logits; classification: (N, K)
    CAM = "cam"  # classification: (N, K, H, W) class activation map computed in the graph


class SaliencyMethod(StrEnum):
    """Saliency methods the workers know how to compute."""

    CAM = "cam"  # read from the graph's CAM output (classifiers with a GAP + linear head)
    OCCLUSION = "occlusion"  # model-agnostic occlusion sensitivity, local-median fill
    RISE = "rise"  # randomised input sampling, local-median baseline
    ENTROPY = "entropy"  # per-pixel softmax entropy (segmentation uncertainty)
    TTA_STD = "tta_std"  # largest std of any class probability over flip test-time augmentation


class TestTimeAugmentation(StrEnum):
    """Input transforms a segmentation model's served prediction averages over."""

    FLIP_COLUMNS = "flip_columns"  # left-right mirror (the columns of each frame reversed)
    REVERSE_CONTEXT = "reverse_context"  # 2.5-D input: neighbour slices in reverse order


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One graph input or output. Dimensions are ints or a symbolic name (e.g. ``"N"``)."""

    name: str
    dtype: Literal["float32", "float16", "uint8", "int64"] = "float32"
    shape: list[int | str]
    role: OutputRole | None = None


class Window(_Strict):
    """A VOI window in modality units (HU for CT), PS3.3 C.11.2.1.2 semantics."""

    center: float
    width: float = Field(gt=0)


class Preprocessing(_Strict):
    """How a decoded frame (modality units, float32, rows × columns) becomes a model input.

    Steps, in order: clip to ``window`` → scale to [0, 1] → resize to ``size`` with
    ``resample`` → ``(x - mean) / std`` → with ``context_slices`` = k > 0, each frame is
    stacked with its k neighbours on either side along the slice normal as input channels
    (2.5-D input: channel k is the frame itself; frames past either end of the series repeat
    the end frame), so the input has 2k + 1 channels.
    """

    modalities: list[str] = Field(default_factory=lambda: ["CT"])
    window: Window
    size: tuple[int, int]  # (height, width) of the network input
    resample: Literal["area", "bilinear", "nearest"] = "area"
    mean: float = 0.0
    std: float = 1.0
    batch_size: int = Field(default=8, ge=1, le=256)
    context_slices: int = Field(default=0, ge=0, le=8)

    @property
    def channels(self) -> int:
        """Input channels of the network: the frame and its neighbours (2k + 1)."""
        return 2 * self.context_slices + 1


class Code(_Strict):
    """A coded concept (e.g. SNOMED CT), used in DICOM SEG/SR outputs."""

    scheme: str
    value: str
    meaning: str


class Label(_Strict):
    """One output class."""

    value: int = Field(ge=0)
    name: str
    category: Code | None = None  # segmented property category (SEG)
    type: Code | None = None  # segmented property type / finding (SEG, SR)
    color: tuple[int, int, int] | None = None  # RGB for overlays


class Classification(_Strict):
    """Turning a classifier logit into a calibrated probability and a label."""

    positive_label: str
    # calibrated probability = sigmoid(logit / temperature + bias): temperature scaling
    # (Guo et al. 2017), with a bias (Platt scaling) when the logits are offset as well
    temperature: float = Field(default=1.0, gt=0)
    bias: float = 0.0
    threshold: float = Field(default=0.5, ge=0, le=1)
    series_aggregation: Literal["max", "mean", "noisy_or"] = "max"
    # operating point of the series probability; None: the slice threshold. The maximum of 32
    # slice probabilities is higher than a single slice's, so it usually needs its own.
    series_threshold: float | None = Field(default=None, ge=0, le=1)

    @property
    def series_operating_point(self) -> float:
        """The threshold the series probability is compared with."""
        return self.threshold if self.series_threshold is None else self.series_threshold


class Review(_Strict):
    """When a result is flagged "uncertain — please review"."""

    probability_band: tuple[float, float] = (0.2, 0.8)
    max_mean_entropy: float | None = None  # segmentation: mean entropy inside the foreground


class ComponentFilter(_Strict):
    """Clean-up of one segmented structure's 3-D connected components (segmentation only).

    The frames of a series are labelled together (26-connectivity across neighbouring
    slices); a component of ``label`` is removed, its voxels becoming ``replace_with``, when
    its volume is below ``min_volume_mm3`` or its highest probability is below
    ``min_probability``. The volume rule needs Pixel Spacing and the slice spacing; without
    them only the probability rule applies. ``fitted`` records how the values were chosen.
    """

    label: str
    replace_with: str
    min_volume_mm3: float = Field(default=0.0, ge=0)
    min_probability: float = Field(default=0.0, ge=0, le=1)
    fitted: dict[str, Any] = Field(default_factory=dict)


class SaliencySpec(_Strict):
    """Which saliency maps the workers compute by default, and their fixed display scale."""

    methods: list[SaliencyMethod]
    display_range: tuple[float, float] = (0.0, 1.0)
    occlusion_patch: int = 32
    occlusion_stride: int = 16
    # a second, finer occlusion sweep around the strongest coarse patch
    # (``workers.pipeline.saliency.occlusion_map``); None: the coarse sweep alone
    occlusion_refine_patch: int | None = Field(default=None, ge=1)
    occlusion_refine_stride: int = Field(default=4, ge=1)
    rise_masks: int = 256
    max_forward_passes: int = 512
    target_label: str | None = None  # segmentation: structure whose score is explained


class Manifest(_Strict):
    """The manifest of one model version (``manifest.json``)."""

    schema_version: Literal[1] = 1
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    version: str = Field(pattern=r"^[0-9A-Za-z][0-9A-Za-z._+-]{0,62}$")
    task: Task
    description: str = ""
    file: str = "model.onnx"
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec] = Field(min_length=1, max_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    preprocessing: Preprocessing
    labels: list[Label] = Field(min_length=1)
    classification: Classification | None = None
    review: Review = Review()
    components: list[ComponentFilter] = Field(default_factory=list)
    saliency: SaliencySpec
    # segmentation: the served probabilities are the mean softmax over every combination of
    # these input transforms (2^n members), each member's output mapped back first
    test_time_augmentation: list[TestTimeAugmentation] = Field(default_factory=list)
    default: bool = True  # served when a request names no model
    provenance: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(f"file must be a plain file name, got {value!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        roles = [o.role for o in self.outputs]
        if OutputRole.LOGITS not in roles:
            raise ValueError("one output must have role 'logits'")
        if self.task is Task.CLASSIFICATION and self.classification is None:
            raise ValueError("classification models need a 'classification' section")
        if SaliencyMethod.CAM in self.saliency.methods and OutputRole.CAM not in roles:
            raise ValueError("saliency method 'cam' needs an output with role 'cam'")
        shape = self.inputs[0].shape
        channels = self.preprocessing.channels
        if len(shape) == 4 and isinstance(shape[1], int) and shape[1] != channels:
            raise ValueError(
                f"input {self.inputs[0].name!r} has {shape[1]} channels but preprocessing "
                f"gives {channels} (context_slices={self.preprocessing.context_slices})"
            )
        values = [label.value for label in self.labels]
        if len(set(values)) != len(values):
            raise ValueError("label values must be unique")
        names = {label.name for label in self.labels}
        for rule in self.components:
            if self.task is not Task.SEGMENTATION:
                raise ValueError("'components' applies to segmentation models only")
            for name in (rule.label, rule.replace_with):
                if name not in names:
                    raise ValueError(f"component filter names {name!r}, which is not a label")
        if self.classification is not None:
            if self.classification.positive_label not in names:
                raise ValueError(
                    f"positive_label {self.classification.positive_label!r} is not a label"
                )
        return self

    @model_validator(mode="after")
    def _augmentable(self) -> Manifest:
        tta = self.test_time_augmentation
        if tta and self.task is not Task.SEGMENTATION:
            raise ValueError("'test_time_augmentation' applies to segmentation models only")
        if len(set(tta)) != len(tta):
            raise ValueError("'test_time_augmentation' lists a transform twice")
        if TestTimeAugmentation.REVERSE_CONTEXT in tta and self.preprocessing.context_slices == 0:
            raise ValueError("'reverse_context' needs context_slices > 0")
        return self

    @property
    def passes_per_frame(self) -> int:
        """Forward passes of the served prediction per frame: 2^n with n test-time transforms."""
        return 1 << len(self.test_time_augmentation)

    @property
    def key(self) -> str:
        """``name:version``, the identity used in jobs and results."""
        return f"{self.name}:{self.version}"

    def label_value(self, name: str) -> int:
        """The value of the label called ``name`` (KeyError if there is none)."""
        for label in self.labels:
            if label.name == name:
                return label.value
        raise KeyError(name)

    def output(self, role: OutputRole) -> TensorSpec | None:
        """The output with ``role``, if the graph has one."""
        return next((o for o in self.outputs if o.role is role), None)
