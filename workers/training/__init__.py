"""Training jobs' model side: fine-tune on a project's exported dataset, compare with the current model on
the held-out part, store the new version and promote it when it is better (:mod:`workers.training.lavt`).

The export itself (Label Studio → RefCOCO folder) is done by the exporters; the job that chains both is
:func:`groundlabel_cli.training.run_training`.
"""
