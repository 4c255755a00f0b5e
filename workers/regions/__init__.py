"""Heatmaps and masks to Label Studio regions (polygons, brush RLE, boxes, key points)."""
