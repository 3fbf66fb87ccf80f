"""Annotations as QuPath exchanges them: GeoJSON polygons in level-0 pixels, read, written and rasterised."""
