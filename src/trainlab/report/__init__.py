"""Rendering of run directories: pictures now, full reports later."""
