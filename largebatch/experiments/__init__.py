"""Batch-size studies: sweeps (``sweep_config``, ``sweep``), the results database
(``results_store``), the numbers of a study (``analysis``) and its report (``report``)."""
