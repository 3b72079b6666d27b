"""Compressed weight layouts: 2:4 semi-structured packing and block-sparse tiles."""
