from .coupling import analyze, Analysis, Group, DimKey

__all__ = ["analyze", "Analysis", "Group", "DimKey"]
