"""nn.Modules and losses only (no file I/O here): the localizers behind one registry (CACE-Net, AVE-CLIP), their
losses, and the fine-tuning heads."""

from .cace import (
    GUIDE_MODES,
    REFERENCE_GUIDE_NAMES,
    CACEConfig,
    CACENet,
    CACEOutput,
    CACEPrediction,
    count_parameters,
    create_model,
    extract_state_dict,
    load_reference_state_dict,
    predict,
    resolve_guide,
)
from .finetune import RESNET_STAGES, AudioVisualContrastive, ProjectionHead  # noqa: F401  (fine-tuning)
from .losses import (
    SegmentTargets,
    cace_loss,
    derive_targets,
    info_nce_loss,
    supervised_contrastive_loss,
)
from .registry import (  # noqa: F401  (the localizer interface)
    LocalizerFamily,
    SegmentPrediction,
    create_localizer,
    family_of,
    get_family,
    list_localizers,
)

__all__ = [
    "GUIDE_MODES",
    "REFERENCE_GUIDE_NAMES",
    "CACEConfig",
    "CACENet",
    "CACEOutput",
    "CACEPrediction",
    "count_parameters",
    "create_model",
    "extract_state_dict",
    "load_reference_state_dict",
    "predict",
    "resolve_guide",
    "SegmentTargets",
    "cace_loss",
    "derive_targets",
    "info_nce_loss",
    "supervised_contrastive_loss",
]
