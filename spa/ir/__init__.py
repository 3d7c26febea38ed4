from .model import Model, load, save_atomic, write_text_atomic, MIN_OPSET, MAX_OPSET

__all__ = ["Model", "load", "save_atomic", "write_text_atomic", "MIN_OPSET", "MAX_OPSET"]
