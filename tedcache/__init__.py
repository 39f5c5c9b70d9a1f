"""tedcache: task-aware layer-wise distillation (TED) through an offline teacher feature cache.

Python API: `extract(ExtractConfig)`, `distill(DistillConfig)`, `finetune(FinetuneConfig)`,
`init_student(source, layers, out)`; the `tedcache` CLI only builds these configs from flags."""

__version__ = "0.1.0"

from .config import DataConfig, DistillConfig, ExtractConfig, FilterConfig, FinetuneConfig, TrainConfig  # noqa: E402
from .distillation import distill  # noqa: E402
from .errors import TedcacheError  # noqa: E402
from .extraction import extract  # noqa: E402
from .finetuning import finetune  # noqa: E402
from .models import init_student  # noqa: E402

__all__ = ["DataConfig", "DistillConfig", "ExtractConfig", "FilterConfig", "FinetuneConfig", "TrainConfig",
           "TedcacheError", "extract", "distill", "finetune", "init_student", "__version__"]
