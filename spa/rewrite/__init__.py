from .apply import apply_plan

__all__ = ["apply_plan"]
