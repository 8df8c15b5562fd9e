"""Jittable array ops."""
