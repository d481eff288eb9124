"""Bytes in and out: fetching URLs, decoding and resizing images, reading URL lists, exporting
training files. Above `core`, below the operators."""
