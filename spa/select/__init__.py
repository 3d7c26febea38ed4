from .local import uniform

__all__ = ["uniform"]
