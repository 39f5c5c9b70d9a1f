"""tedcache: task-aware layer-wise distillation (TED) through an offline teacher feature cache.

Python API: `extract(ExtractConfig)`, `distill(DistillConfig)`, `finetune(FinetuneConfig)`,
`compare(CompareConfig)`, `tune(TuneConfig)`, `select(SelectConfig)`, `init_student(StudentConfig)`; the
`tedcache` CLI only builds these configs from flags and config files."""

from importlib.metadata import PackageNotFoundError, version

from .config import (
    CompareConfig,
    DataConfig,
    DistillConfig,
    ExtractConfig,
    FilterConfig,
    FinetuneConfig,
    OptimConfig,
    SelectConfig,
    StudentConfig,
    TuneConfig,
)
from .distillation import distill
from .errors import TedcacheError
from .experiments.compare import compare
from .experiments.selection import select
from .experiments.tune import tune
from .extraction import extract
from .finetuning import finetune
from .students import init_student

try:
    __version__ = version("tedcache")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["CompareConfig", "DataConfig", "DistillConfig", "ExtractConfig", "FilterConfig", "FinetuneConfig",
           "OptimConfig", "SelectConfig", "StudentConfig", "TedcacheError", "TuneConfig", "compare", "distill", "extract",
           "finetune", "init_student", "select", "tune", "__version__"]
