"""Hackboot Cloud."""
