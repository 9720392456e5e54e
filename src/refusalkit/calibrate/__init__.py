"""Calibration: cut false refusals and keep the real ones (Wang et al., ICLR 2025; docs/calibrate.md).

The false-refusal direction is the difference in means between pseudo-harmful prompts the model refuses
(OR-Bench-Hard, OKTest: requests that look harmful but are not) and harmless prompts, orthogonalized
against the run's refusal direction by lambda in [0, 1] and ablated. Modules: ``data`` (the over-refusal
prompt sets), ``rates`` (judged over-refusal rates under an edit), ``vector`` (the means and the
orthogonalization), ``choose`` (the (layer, position) selection under a KL limit and a harmful-refusal
floor), ``run`` (``refusalkit calibrate``, resumable), ``options``, ``cli`` and ``report``.
"""
