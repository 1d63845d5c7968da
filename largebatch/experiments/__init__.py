"""Batch-size studies: sweeps (``sweep_config``, ``sweep``), the results database
(``results_store``), the numbers of a study (``analysis``), diagnostics of saved
runs (``checkpoint_diagnostics``, and ``diagnose`` for a whole sweep) and the
report (``report``, its diagnostics sections in ``diagnostics_sections``, figures
in ``plots``)."""
