"""Quality measurement: benchmark datasets, generated scenes, metrics and the tiny trained models that the
offline quality tests and ``groundlabel eval-*`` use."""
