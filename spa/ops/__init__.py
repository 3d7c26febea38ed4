"""Op rules. Importing this package registers every rule (one module per op family)."""
from . import registry  # noqa: F401
from . import elementwise, conv, norm, matmul, shape, concat_split, pooling  # noqa: F401
from .registry import RULES, rule, get

__all__ = ["RULES", "rule", "get"]
