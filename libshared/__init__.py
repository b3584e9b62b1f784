"""Shared by every vslice service: schemas, the resource model, codecs, settings."""
