from .chunked import wkv7_chunked
from .reference import wkv7_reference

__all__ = ["wkv7_chunked", "wkv7_reference"]
