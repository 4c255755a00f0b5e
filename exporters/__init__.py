"""Label Studio annotations to training datasets: COCO, RefCOCO, gRefCOCO."""
